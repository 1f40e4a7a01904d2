"""Layer 1, models: offline loading, precision, LoRA, the scalar-head model, mixtures."""
