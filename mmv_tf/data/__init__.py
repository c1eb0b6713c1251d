"""Datasets: the TFRecord schema, writers (real videos, synthetic clips) and tf.data pipelines."""
