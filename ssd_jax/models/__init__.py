"""Flax Linen modules: VQ tokenizer, AR transformer, neighbour heads."""
