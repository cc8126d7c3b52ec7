"""Fidelity measures for generated images: FID, class accuracy, target NLL (bench.py)."""
