"""The generation engine for decoder models: static KV cache, prefill and decode steps, sampling, batching."""
