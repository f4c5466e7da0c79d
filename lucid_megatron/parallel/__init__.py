"""Process groups and collective helpers (tensor, sequence, context and data parallelism)."""
