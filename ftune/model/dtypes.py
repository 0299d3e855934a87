"""Config dtype names and the torch dtypes they stand for, shared by model loading and quantization."""

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
