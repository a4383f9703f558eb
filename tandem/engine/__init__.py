"""The inference engine of one worker: model, paged KV cache, scheduler, sampler."""
