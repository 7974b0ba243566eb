"""Modeling code shipped inside non-uniform pruned checkpoints (``trust_remote_code=True``)."""
