"""Engine pieces both pools share: the paged KV cache and its allocator, requests, sampling, the model runner."""
