"""Low-rank factorization: replace a linear layer by two thin ones (plain and activation-aware SVD)."""
