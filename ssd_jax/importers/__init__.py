"""Importers of other projects' checkpoints into our run-folder layout."""
