"""Export to SavedModel for TF Serving, warmup records, a local TF-Serving-protocol server and a client."""
