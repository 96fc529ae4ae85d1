"""Networks: denoisers D(x, sigma, c) over diffusers models, the one-step generator, pipelines, samplers."""
