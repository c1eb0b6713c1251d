"""Keras 3 models: backbones (S3D-G, TSM-ResNet, audio ResNet, text), heads, MMV, deflation."""
