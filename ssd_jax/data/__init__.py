"""Datasets served through tensorflow-datasets data sources (no TensorFlow needed)."""
