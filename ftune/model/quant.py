"""Quantized loading with bitsandbytes: the only module that reads `quant.*` and `distill.teacher_bits`.

QLoRA keeps the frozen base in 4 bits (NF4 by default) and trains LoRA adapters in full precision on top; the
same settings can load a distillation teacher in 4 or 8 bits, since a teacher only runs forward.
"""

from accelerate import PartialState
from peft import prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

from ftune.compat import turn_off_cpu_repacking
from ftune.config.schema import QuantCfg, RunCfg
from ftune.errors import ResourceError
from ftune.model.dtypes import quant_compute_dtype


def student_load_kwargs(cfg: RunCfg) -> dict:
    """`from_pretrained` keyword arguments that quantize the trained model (none when `quant.bits=0`)."""
    return load_kwargs(cfg.quant, cfg.quant.bits, "quant.bits")


def teacher_load_kwargs(cfg: RunCfg) -> dict:
    """`from_pretrained` keyword arguments that quantize the teacher (none when `distill.teacher_bits=0`)."""
    return load_kwargs(cfg.quant, cfg.distill.teacher_bits, "distill.teacher_bits")


def load_kwargs(quant: QuantCfg, bits: int, key: str) -> dict:
    """Quantization config and device map for `bits` (0: no quantization), `key` naming the setting in errors.

    The weights are quantized while loading, straight onto the device that runs them: accelerate refuses to
    move a quantized model afterwards.
    """
    if not bits:
        return {}
    require_bitsandbytes(key, bits)
    return {"quantization_config": bnb_config(quant, bits), "device_map": {"": PartialState().device}}


def bnb_config(quant: QuantCfg, bits: int) -> BitsAndBytesConfig:
    """The BitsAndBytesConfig (transformers) for 8-bit (LLM.int8) or 4-bit (`quant.type`) weights.

    Args:
        quant: data type, double quantization and compute dtype of 4-bit weights.
        bits: 4 or 8.

    Returns:
        The config to pass as `quantization_config` to `from_pretrained`.
    """
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=quant_compute_dtype(quant.compute_dtype),
    )


def require_bitsandbytes(key: str, bits: int) -> None:
    """Fail with one line, before any weight loads, when bitsandbytes is missing or cannot load its kernels.

    Raises:
        ResourceError: bitsandbytes cannot be imported on this machine.
    """
    try:
        import bitsandbytes  # noqa: F401  (the import itself loads the native library of this device)
    except (ImportError, RuntimeError, OSError) as err:
        raise ResourceError(
            f"{key}={bits}: bitsandbytes is not usable here: {str(err).splitlines()[0] if str(err) else err!r}",
            f"pip install 'bitsandbytes>=0.46' for this device, or set {key}=0",
        ) from err


def disable_cpu_inference_repacking(model) -> int:
    """Keep bitsandbytes' 4-bit weights in the layout that autograd and every shape support; returns how many.

    bitsandbytes 0.50 (its fused CPU kernel, PR #1804) repacks a `Linear4bit`'s weight in place, for good,
    the first time it runs in eval mode without grad on a CPU with AVX512-BF16. After that, training forwards
    bypass autograd, so no gradient flows back through the frozen base and earlier adapters silently stop
    learning (our first evaluation or probe runs exactly that way); and layers whose output size is not a
    multiple of 32 fail an assertion. Turning the repacking off per layer costs only inference speed.
    tests/model/test_quant.py::test_bitsandbytes_cpu_repacking_still_breaks_training fails once upstream
    fixes this; then this function can go.
    """
    if not is_quantized(model):
        return 0
    import bitsandbytes as bnb

    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for layer in layers:
        turn_off_cpu_repacking(layer)
    return len(layers)


def is_quantized(model) -> bool:
    """Whether `model` was loaded with 4- or 8-bit bitsandbytes weights."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_quantized(model):
    """PEFT's k-bit preparation: freeze every base weight and upcast the unquantized ones to fp32.

    Norms and the head left in fp16/bf16 next to 4-bit weights make training unstable (a QLoRA pitfall).
    Gradient checkpointing is not switched on here: `model/load.py` does that the same way for every method.
    A model that is not quantized is returned unchanged.
    """
    if not is_quantized(model):
        return model
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
