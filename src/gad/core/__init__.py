"""Layer 0, run bookkeeping: metrics and phase timers, checkpoints, the cache folder."""
