"""Model loading, quantization, adapters and memory planning."""
