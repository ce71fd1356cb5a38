"""genfuse.runtime: models, weight loaders, KV cache, sampler, engine (builds on genfuse.kernels)."""
