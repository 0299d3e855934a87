"""Every private or version-fragile internal of a library that ftune relies on, fenced here and nowhere else.

A library release that moves one of these breaks ftune in one place, and `tests/test_compat.py` says which: one
test per internal, exercising the upstream behaviour ftune relies on, whose failure names the library, the
installed and the checked version, and what moved. The newest-versions mode of CI (`FTUNE_DEPS=latest bash
.ci/run`) runs those tests against every dependency's newest release, so a move is found before the pins
(constraints.txt) are refreshed. Each function below names the library, the internal, the version it was
checked on and what ftune uses it for; how to update one is in docs/design.md ("Library internals").

This module imports nothing of ftune (every layer may import it) and no library at import time (`ftune --help`
stays instant, and bitsandbytes may be missing): each function imports what it fences when called.

Not fenced: `nn.Module._modules`, `_parameters` and `_buffers`, which `plan/trace.py` swaps to trace a few
layers on fake tensors. They are underscored but are torch's stable module state in practice (`state_dict`,
`named_parameters` and every wrapper library read and write them), not internals that move between releases.
"""

BITSANDBYTES_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
"""bitsandbytes' internal module logger (checked on bitsandbytes 0.50.2) that warns, on CPUs with AVX512-BF16, that
it cannot fetch an optional hub kernel; `ftune.cli.quiet_libraries` raises its level, since the user cannot act on
it."""


def compile_chat_template(jinja: str):
    """A chat template compiled as transformers compiles it: a `jinja2.Template`, cached per text.

    transformers' private `transformers.utils.chat_template_utils._compile_jinja_template` (checked on transformers
    5.25.0): its sandbox, `trim_blocks`/`lstrip_blocks`, filters and `raise_exception`. `ftune.data.templates`
    renders with it directly, since `apply_chat_template`'s per-call work costs three times the rendering, and
    transformers has no public entry point below that.
    """
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return _compile_jinja_template(jinja)


def recorded_output(model, name: str) -> tuple[type, int] | None:
    """The module class whose forward output transformers records as `name`, and that output's index; None if none.

    transformers' private `PreTrainedModel._can_record_outputs` and its `transformers.utils.output_capturing.
    OutputRecorder` entries (checked on transformers 5.25.0). `ftune.model.moe` hooks the router modules it names
    for `router_logits`: the classes an MoE model itself declares for `output_router_logits`.
    """
    from transformers.utils.output_capturing import OutputRecorder

    spec = (getattr(model, "_can_record_outputs", None) or {}).get(name)
    if spec is None:
        return None
    return (spec.target_class, spec.index) if isinstance(spec, OutputRecorder) else (spec, 0)


def load_balancing_loss(router_logits: tuple, num_experts: int, top_k: int, attention_mask=None):
    """The Switch-Transformer load-balancing loss of one forward's router logits (one tensor per MoE layer).

    transformers' `transformers.models.mixtral.modeling_mixtral.load_balancing_loss_func` (checked on transformers
    5.25.0), a module-level helper of one model family that the MoE families copy. `ftune.model.moe` adds it to
    ftune's own loss, as transformers does when it computes the loss from `labels`. `attention_mask`: 2D or None.
    """
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)


def modules_kept_unquantized(model) -> list[str]:
    """Names of the modules transformers' quantizers leave unquantized: the output head and tied weights.

    transformers' `transformers.quantizers.base.get_keys_to_not_convert` (checked on transformers 5.25.0), an
    undocumented helper of its quantizers. `ftune.plan.meta` plans the quantized storage of every other linear.
    """
    from transformers.quantizers.base import get_keys_to_not_convert

    return get_keys_to_not_convert(model)


def module_to_run(module):
    """The module whose forward `module`'s forward runs: for PEFT's `modules_to_save` wrapper, the one it picks.

    A copy of the choice in peft's `peft.utils.other.ModulesToSaveWrapper.forward` (checked on peft 0.21.2; PEFT
    exposes it only through that forward): the original module when adapters are disabled, no adapter is
    active, or an active adapter has no copy; else the active adapter's trained copy. Any other module is its
    own. `ftune.train.head` takes the output head apart through it.
    """
    from peft.utils.other import ModulesToSaveWrapper

    if not isinstance(module, ModulesToSaveWrapper):
        return module
    active = module.active_adapters
    if module.disable_adapters or not active or any(name not in module.modules_to_save for name in active):
        return module.original_module
    return module.modules_to_save[active[0]]


def dataset_hash(dataset) -> str:
    """The hash `datasets` keeps of a dataset's content and the transforms applied to it.

    datasets' private `Dataset._fingerprint` (checked on datasets 5.2.0), which its own cache keys on.
    `ftune.data.formats` puts it in the cache key of a saved or hub dataset source.
    """
    return dataset._fingerprint


def cache_keyword() -> str:
    """What transformers calls a KV cache, as a model output's field and as `forward`'s and `generate`'s keyword.

    `cache` since transformers renamed `past_key_values` (checked on transformers 5.25.0, where the old keyword still
    works, with a FutureWarning, until 5.40 for `forward` and 6.0 for `generate`); the earlier 5.x releases that
    pyproject's `transformers>=5.0` admits know only `past_key_values`. `ftune.eval.generation` computes each
    prompt of a group once and hands `generate` that cache.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def fake_mode_active() -> bool:
    """Whether a torch `FakeTensorMode` is active: tensors made now hold shapes and dtypes, no values.

    torch's private `torch._guards.detect_fake_mode` (checked on torch 2.13.0). `ftune.kernels.dropout` draws
    nothing on fake tensors (`ftune plan`'s trace).
    """
    import torch._guards

    return torch._guards.detect_fake_mode() is not None


def fake_mode():
    """A new torch `FakeTensorMode`, under which operations compute shapes and dtypes, no values, no memory.

    torch's private `torch._subclasses.fake_tensor.FakeTensorMode` (checked on torch 2.13.0). `ftune.plan.trace`
    runs a training step under it to measure what autograd keeps.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def fake_like(mode, meta, device):
    """A fake tensor of `mode` with the shape, dtype and strides of the meta tensor `meta`, said to be on `device`.

    torch's private `torch._subclasses.fake_tensor.FakeTensor` constructor (checked on torch 2.13.0).
    `ftune.plan.trace` swaps a meta-device model's parameters and buffers for these.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    return FakeTensor(mode, meta, device)


def dispatch_mode(handler):
    """A context manager under which every aten operation calls `handler(func, args, kwargs)` for its result.

    torch's private `torch.utils._python_dispatch.TorchDispatchMode` (checked on torch 2.13.0): it runs below
    autograd, which still records (and saves for) the operation as called. `ftune.plan.trace` computes there
    what fake tensors cannot.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class Handled(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return handler(func, args, kwargs or {})

    return Handled()


def storage_key(tensor) -> int:
    """A number that tells the storage under `tensor` apart from every other storage alive (fake ones too).

    torch's private `UntypedStorage._cdata` (checked on torch 2.13.0), the address of the C++ storage: views of
    one tensor share it. `data_ptr()` cannot serve: a fake tensor has no data. `ftune.plan.trace` counts each
    saved storage once.
    """
    return tensor.untyped_storage()._cdata


def grouped_mm_op():
    """The aten operation of grouped matrix products (MoE experts), as a dispatch mode sees it.

    torch's private `torch.ops.aten._grouped_mm.default` (checked on torch 2.13.0), the operation below the
    public `torch.nn.functional.grouped_mm`. `ftune.plan.trace` runs it in bf16 on fake tensors, whose kernel
    refuses fp32.
    """
    import torch

    return torch.ops.aten._grouped_mm.default


def convolution_base() -> type:
    """The base class of torch's convolution layers (Conv1d-3d, their transposed and lazy forms).

    torch's private `torch.nn.modules.conv._ConvNd` (checked on torch 2.13.0). `ftune.model.adapters` tells a
    convolution's kernel apart from a stack of expert matrices of the same rank.
    """
    from torch.nn.modules.conv import _ConvNd

    return _ConvNd


def turn_off_cpu_repacking(layer) -> None:
    """Keep a bitsandbytes `Linear4bit`'s weight in the layout autograd supports, on every CPU.

    bitsandbytes' undocumented `Linear4bit.support_avx512bf16_for_cpu` switch (checked on bitsandbytes 0.50.2),
    which its forward reads before repacking the weight, for good, on a CPU with AVX512-BF16 (see
    `ftune.model.quant.disable_cpu_inference_repacking` for why ftune turns it off).
    """
    layer.support_avx512bf16_for_cpu = False


def neftune_noise(model, alpha: float) -> None:
    """Put transformers' NEFTune forward hook on the input embeddings of `model` (a PreTrainedModel or a PeftModel).

    Uniform noise of scale alpha / sqrt(L x d) on the embeddings while the module trains, none in eval mode.
    """
    from transformers.integrations.neftune import activate_neftune

    activate_neftune(model, alpha)
