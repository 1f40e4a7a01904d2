"""Layer 0, settings: a frozen dataclass per stage, loading (YAML + overrides), ranges."""
