"""gad: black-box on-policy distillation of LLMs (GAD, SeqKD, reward distillation)."""

__version__ = "0.1.0"
