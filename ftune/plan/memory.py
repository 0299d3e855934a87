"""Bytes of weights, gradients and optimizer state, and how a distribution strategy divides them per GPU.

Counted from the tensors of a meta-device model, so every dtype is the one training really uses (adapters in
fp32, weights upcast by k-bit preparation); quantized weights are counted by bitsandbytes' storage layout:
- 4-bit (NF4/FP4): two weights per byte, one absmax per block of 64 weights, fp32, or with double quantization
  8-bit plus one fp32 absmax per 256 blocks, a fp32 offset and the 256-entry fp32 code of that second level;
  and the 16-entry fp32 code of the 4-bit type. About 4.5 bits per weight, 4.127 with double quantization.
- 8-bit (LLM.int8): one int8 per weight and one fp32 scale per output row.
Optimizer state per trainable weight: torch's AdamW keeps two moments in the parameter's dtype; bitsandbytes'
8-bit AdamW two uint8 moments with one fp32 absmax each per block of 256, but fp32 moments for tensors under
4096 elements and for embeddings (`train/optim.py` keeps those 32-bit); its 32-bit AdamW two fp32 moments.
Paged variants need the same GPU memory until the driver evicts their pages under pressure, so they count the
same.
"""

import math

import torch

NF4_BLOCK = 64
"""Weights per absmax of bitsandbytes' 4-bit quantization."""
NESTED_BLOCK = 256
"""Absmax values per second-level absmax with double quantization."""
NESTED_CODE = 256
"""Entries of the fp32 code that double quantization keeps per weight."""
FOUR_BIT_CODE = 16
"""Entries of the fp32 code of the 4-bit data type, kept per weight."""
OPTIM_BLOCK = 256
"""Elements per absmax of bitsandbytes' 8-bit optimizer states."""
MIN_8BIT_SIZE = 4096
"""bitsandbytes keeps fp32 states for tensors smaller than this (its `min_8bit_size` default)."""
FP32 = 4
SHARDINGS = ("none", "zero2", "zero3", "fsdp")
"""none: one replica per GPU (one GPU, or DDP); zero2: gradients and optimizer state sharded (DeepSpeed ZeRO-2);
zero3 and fsdp: weights sharded too (DeepSpeed ZeRO-3, PyTorch FSDP full shard)."""
GATHERED_LAYERS = 2
"""ZeRO-3/FSDP all-gather the layer being computed and prefetch the next one, unsharded."""


def quantized_bytes(numel: int, out_features: int, bits: int, double_quant: bool) -> int:
    """Storage of one weight matrix quantized by bitsandbytes to `bits` (see the module docstring)."""
    if bits == 8:
        return numel + FP32 * out_features
    blocks = math.ceil(numel / NF4_BLOCK)
    absmax = blocks + FP32 * (math.ceil(blocks / NESTED_BLOCK) + 1 + NESTED_CODE) if double_quant else FP32 * blocks
    return math.ceil(numel / 2) + absmax + FP32 * FOUR_BIT_CODE


def tensor_bytes(tensor: torch.Tensor, cast: int | None = None) -> int:
    """Bytes of a (meta) tensor, or of its floating copy in a `cast`-byte dtype."""
    size = cast if cast and tensor.is_floating_point() else tensor.element_size()
    return tensor.numel() * size


def weights_bytes(params: list[torch.nn.Parameter], quantized: dict[int, int], cast: int | None = None) -> int:
    """Bytes of the weights; `quantized` maps id(parameter) -> storage of the ones bitsandbytes quantizes."""
    return sum(quantized[id(p)] if id(p) in quantized else tensor_bytes(p, cast) for p in params)


def optimizer_bytes(
    name: str, trainable: list[torch.nn.Parameter], master: bool = False, embeddings: frozenset[int] = frozenset()
) -> int:
    """Optimizer state of the trainable weights for `optim.name`.

    Args:
        name: `optim.name` (adamw, adamw_8bit, paged_adamw_8bit, paged_adamw_32bit).
        trainable: the parameters that train.
        master: DeepSpeed mixed precision: the optimizer also keeps an fp32 master copy and its moments are fp32.
        embeddings: ids of embedding weights, whose 8-bit optimizer states are kept in 32 bits.

    Returns:
        Bytes of optimizer state.
    """
    total = 0
    for p in trainable:
        n = p.numel()
        if name in ("adamw_8bit", "paged_adamw_8bit") and n >= MIN_8BIT_SIZE and id(p) not in embeddings:
            total += 2 * (n + FP32 * math.ceil(n / OPTIM_BLOCK))
        elif name == "adamw" and not master:
            total += 2 * tensor_bytes(p)
        else:
            total += 2 * FP32 * n
        total += FP32 * n if master else 0
    return total


def per_gpu(weights: float, grads: float, optimizer: float, gathered: float, sharding: str, gpus: int):
    """Divide replica-wide bytes by the distribution strategy: (weights, grads, optimizer) on each GPU.

    DDP (sharding none on several GPUs) copies gradients into its all-reduce buckets, so they count twice.
    ZeRO-3 and FSDP also hold `gathered` bytes: the unsharded layers in flight.
    """
    if sharding == "none":
        return weights, grads * (2 if gpus > 1 else 1), optimizer
    if sharding == "zero2":
        return weights, grads / gpus, optimizer / gpus
    return weights / gpus + gathered, grads / gpus, optimizer / gpus
