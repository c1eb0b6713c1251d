"""mmv_tf: self-supervised multimodal video models in TensorFlow / Keras 3.

Importing the top-level package is cheap (no TensorFlow import); import the sub-packages you need:
`mmv_tf.data`, `mmv_tf.models`, `mmv_tf.losses`, `mmv_tf.training`, `mmv_tf.evaluation`, `mmv_tf.serving`.
"""

__version__ = "0.1.0"
