"""Recovery distillation after pruning or factorization: the original model teaches the compressed one."""
