"""Layer 4, evaluation: answering held-out prompts, scoring them, the report."""
