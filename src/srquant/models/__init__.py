"""SR architectures written for srquant, and the registry of their pretrained checkpoints."""
