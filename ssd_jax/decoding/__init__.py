"""The decoding engine: every method is one jitted lax.while_loop over a state dataclass."""
