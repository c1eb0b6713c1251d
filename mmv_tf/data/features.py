"""Names of the features that pipelines produce and models, losses and evaluation consume.

See docs/internals.md for dtypes and shapes. TFRecord keys are in `schema.py`, not here.
"""
VIDEO = "video"          # float32 [B,T,H,W,3] in [0,1]   (multi-clip eval: [B,N,T,H,W,3])
AUDIO = "audio"          # float32 [B,S] waveform           (multi-clip eval: [B,N,S])
LOG_MEL = "log_mel"      # float32 [B,F,80,1]               (multi-clip eval: [B,N,F,80,1])
TEXT_IDS = "text_ids"    # int32 [B,K,L]
TEXT_MASK = "text_mask"  # float32 [B,K]: 1 for a real candidate caption
HAS_TEXT = "has_text"    # float32 [B]: 1 if the clip has at least one caption
LABEL = "label"          # int32 [B], -1 when unlabelled
CAPTION = "caption"      # string [B,K] raw captions (evaluation)
