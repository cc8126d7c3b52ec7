"""Training stages (tokenizer, ar, heads, ...) sharing one loop and one checkpoint format."""
