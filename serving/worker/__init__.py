"""What runs the model: the model runner (weights, KV cache, prefill, decode, sampling), compiled decode
steps and their cache, and the per-width latency profile."""
