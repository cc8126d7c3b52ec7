"""One module per decoding method; each defines METHODS (see ssd_jax/decoding/registry.py)."""
