"""Layer 2, training: the engine, rollouts, losses, the run loop, SFT and reward model."""
