"""The data pipeline: formats -> chat template -> tokens and labels -> truncation -> padding or packing."""
