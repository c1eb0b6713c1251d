"""VATT (Akbari et al. 2021, "VATT: Transformers for Multimodal Self-Supervised Learning from Raw Video, Audio
and Text"): convolution-free Transformer towers on raw video, audio waveform and text, with MMV's FAC head.

| module | contents |
|---|---|
| `transformer` | pre-LN Transformer encoder (video, audio, modality-agnostic) and the T5-style text encoder |
| `backbones` | video ViT (4x16x16 tubelets), audio WaT (128-sample patches), text (word2vec + T5), the modality-agnostic backbone, DropToken, position tables and their cubic re-sampling |
| `heads` | the FAC projection head as in the authors' released code |
| `model` | `VATTModel` (towers + FAC head), its config defaults, `tiny_vatt_config` |
| `losses` | the released code's loss (AsymmetricNCE: NCE video-audio, MIL-NCE video-text, their average) |
| `signatures` | export signatures (`video`, `audio`, `text`, `text_ids`) and the evaluation embedder |
| `family` | `VATTFamily`, registered here |
"""
from mmv_tf.families import registry
from mmv_tf.families.vatt.family import FAMILY

registry.register(FAMILY)
