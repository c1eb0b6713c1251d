"""Importers for released checkpoints (MMV Haiku pickles)."""
