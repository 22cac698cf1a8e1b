"""Model building blocks: paged attention, rotary embeddings, norms, activations, merged linears, the sampler."""
