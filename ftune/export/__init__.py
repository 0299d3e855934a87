"""`ftune export`: serving formats (hf, gguf, adapter), each read back by its runtime and checked; model cards."""
