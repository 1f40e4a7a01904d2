"""Layer 3, on-policy methods: GAD, its rewards, the white box, SODA, selection."""
