"""Pruning: unstructured and N:M sparsity, and structured slimming to a smaller dense model."""
