"""Model implementations over the packed, paged batch, and how to load them from HF checkpoints."""
