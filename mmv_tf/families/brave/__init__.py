"""BraVe (Recasens et al. 2021, "Broaden Your Views for Self-Supervised Video Learning").

A narrow view (a short, high-resolution RGB clip) and a broad view (a long clip: audio log-mel, optionally
low-resolution video) each predict the other through one shared projector + predictor, with a normalised
L2 regression loss, a stop-gradient on the target projection and no EMA target network.

| module | what |
|---|---|
| `family` | `BraveFamily`, registered here as `brave` (docs/families.md) |
| `model` | `BraveModel`: narrow TSM-ResNet50 tower, broad audio ResNet50 (or video) tower, shared head |
| `data` | the training views through the named-view pipeline, BraVe's augmentations, audio looping |
| `signatures` | `video`, `audio`, `audio_spectrogram` (or `broad_video`), `image`, `image_bytes` |
| `heads` | `Projector`, `Predictor` and the shared `BraveHead` (synchronized BN, float32 outputs) |
| `losses` | `regression_loss` (1 − cos against a stop-gradient target), `brave_loss` (both directions), `cross_view_embedding` (retrieval by the loss) |
| `audio` | BraVe's log-mel recipe (320-sample STFT, hop 160, log(1 + 10⁴·mel)) |
| `augment` | per-clip Gaussian blur, random convolution, and the colour / flip settings of the paper |

The LARS optimiser (intended masks, per-variable gradient scales) lives in `mmv_tf.training.optimizers`;
the predictor's scale (`heads.BRAVE_GRADIENT_SCALES`) comes from `BraveFamily.optimizer_options`; the
warm-up + cosine schedule in `mmv_tf.training.schedules`.
"""
from mmv_tf.families import registry
from mmv_tf.families.brave.family import FAMILY

registry.register(FAMILY)
