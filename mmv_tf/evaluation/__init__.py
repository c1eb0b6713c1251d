"""Evaluation: feature extraction, linear probes, zero-shot retrieval/classification, reports."""
