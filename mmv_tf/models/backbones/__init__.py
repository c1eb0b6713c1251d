"""Video, audio and text backbones, one per file."""
