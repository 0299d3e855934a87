"""ftune: a config-driven fine-tuning CLI for large language models."""

__version__ = "0.1.0"
