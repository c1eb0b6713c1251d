"""The TFRecord contract (docs/data_format.md): DMVR-compatible `tf.train.SequenceExample` keys.

One record is one clip. Every reader and writer in the package uses these constants instead of string
literals, so the layout lives in exactly one place. Records written with these keys are readable by
DMVR (`modalities.add_image/add_audio/add_text/add_label` defaults) and by TF Model Garden's video reader.

feature_lists (one entry per time step):
  IMAGE_ENCODED      bytes, one JPEG per frame.
  WAVEFORM           float, a *single* Feature holding the whole mono waveform in [-1, 1].
context (per clip):
  CAPTION            bytes, zero or more captions (UTF-8).
  LABEL_INDEX        int64, zero or more class indices (indices into labels.txt of the dataset).
  LABEL_TEXT         bytes, the class names matching LABEL_INDEX.
  VIDEO_FILENAME     bytes, the source file (or a synthetic id).
  CLIP_START_US / CLIP_END_US   int64, clip boundaries in the source video, microseconds.
Extra context keys written by this package (allowed by DMVR, ignored by its default readers):
  FRAME_RATE         float, frames per second of IMAGE_ENCODED.
  SAMPLE_RATE        int64, samples per second of WAVEFORM.
  AUDIO_IS_SILENCE   int64, 1 when the source had no audio track and silence was written instead.
"""

# feature_lists
IMAGE_ENCODED = "image/encoded"
WAVEFORM = "WAVEFORM/feature/floats"

# context
CAPTION = "caption/string"
LABEL_INDEX = "clip/label/index"
LABEL_TEXT = "clip/label/text"
VIDEO_FILENAME = "video/filename"
CLIP_START_US = "clip/start/timestamp"
CLIP_END_US = "clip/end/timestamp"
FRAME_RATE = "clip/frame_rate"
SAMPLE_RATE = "clip/audio/sample_rate"
AUDIO_IS_SILENCE = "clip/audio/is_silence"

DEFAULT_FPS = 10.0
DEFAULT_SAMPLE_RATE = 48000
DEFAULT_MIN_SIDE = 256
LABELS_FILENAME = "labels.txt"
SKIPPED_FILENAME = "skipped.csv"
