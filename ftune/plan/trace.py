"""Activation memory of one training step, measured on fake tensors: what autograd keeps for the backward pass.

The model is built as the run builds it (`plan/meta.py`), its tensors swapped for fake ones (torch's fake
tensor mode, `ftune.compat.fake_mode`: shapes, dtypes and a CPU device, no data and no memory), and one
micro-batch of the run's shape goes through its real forward and the run's real step loss (`train/losses.py`:
chunked or not, with the distillation teacher), under the autocast training uses. Every tensor autograd saves for
the backward is recorded with `saved_tensors_hooks`, each storage once, parameters excluded: what
tests/plan/test_plan.py measures on a real CPU step. The backward itself is not run: it saves nothing more.

With gradient checkpointing a step keeps each decoder layer's input and, while the backward recomputes a layer,
that layer's working set: both are read off the same trace, layer by layer. Identical layers keep identical bytes,
so one layer of each kind is traced and its bytes stand for the others (`representatives`): a 7B model's step
traces two of its 32 layers.

A storage counts if autograd still holds it when the forward ends: a graph nobody keeps is freed at once (the
head's output that `train/head.py` discards) and its saved tensors with it.

Not counted: transient buffers (the logits before the loss, counted apart by `ftune plan`; gradients in
flight), the attention mask of padded batches, allocator fragmentation and the CUDA context.
"""

import contextlib
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ftune.compat import dispatch_mode, fake_like, fake_mode, grouped_mm_op, storage_key
from ftune.config.schema import RunCfg
from ftune.model.blocks import decoder_layers, decoder_of

StepLossBuilder = Callable[..., Callable[[torch.nn.Module, dict], dict]]
"""`ftune.train.losses.build_step_loss`, handed in by the command: plan/ does not import train/."""


@dataclass
class Trace:
    """Bytes autograd saved during one micro-batch's forward, split by where they were saved."""

    outside: int = 0
    """Embeddings, final norm, head and loss: everything outside the decoder layers."""
    layers: list[int] = field(default_factory=list)
    """Each decoder layer's working set."""
    inputs: list[int] = field(default_factory=list)
    """Each decoder layer's input (the hidden states gradient checkpointing keeps)."""

    def activations(self, checkpointing: bool) -> int:
        """Bytes kept from the forward to the backward; checkpointed: layer inputs plus one recomputed layer."""
        if checkpointing:
            return self.outside + sum(self.inputs) + max(self.layers, default=0)
        return self.outside + sum(self.layers)


def trace_step(model: torch.nn.Module, cfg: RunCfg, seq_len: int, autocast: torch.dtype | None,
               step_loss: StepLossBuilder, teacher: torch.nn.Module | None = None) -> Trace:
    """Run one micro-batch of `model` (built on the meta device) and its step loss on fake tensors.

    Args:
        model: the student as training prepares it, on the meta device (swapped to fake tensors here, for good).
        cfg: the run: micro batch, loss chunking, distillation.
        seq_len: tokens per sequence.
        autocast: the dtype the forward autocasts to, None for none.
        step_loss: builds the run's loss from (model, trainer config, teacher, distillation config).
        teacher: the distillation teacher on the meta device, or None.

    Returns:
        The saved bytes by place.
    """
    loss = step_loss(model, cfg.trainer, teacher, cfg.distill if teacher is not None else None)  # on real modules
    mode = fake_mode()
    for module in (model, teacher):
        if module is not None:
            make_fake(module, mode)
    layers = decoder_layers(model)
    kinds = representatives(layers, layer_types(model))
    saved = SavedTensors({storage_key(p) for p in model.parameters()})
    cast = torch.autocast("cpu", dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with only_layers(model, sorted(set(kinds))) as traced, watched(traced, saved), mode, dispatch_mode(fake_kernel), \
            torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda tensor: tensor):
        ids = torch.zeros(cfg.trainer.micro_batch_size, seq_len, dtype=torch.long)
        with cast:  # accelerate autocasts the model's forward; the step loss picks the same matmul dtype
            out = loss(model.train(), {"input_ids": ids, "labels": ids})
        kept = saved.kept()
        del out
    return Trace(outside=kept.get(None, 0), layers=[kept.get(kind, 0) for kind in kinds],
                 inputs=[saved.inputs[kind] for kind in kinds])


class SavedTensors:
    """The tensors autograd saves, each with the place it was saved at: a decoder layer's index, or None outside."""

    def __init__(self, parameters: set[int]):
        self.parameters = parameters
        """Storages of the parameters (not activations)."""
        self.place: int | None = None
        self.inputs: dict[int, int] = {}
        """Bytes of each traced layer's input."""
        self.entries: list[tuple[weakref.ref, int, int, int | None]] = []

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        """The saved-tensor hook: note the tensor (weakly: autograd's graph is what keeps it) and keep it as is."""
        key = storage_key(tensor)
        if key not in self.parameters:
            self.entries.append((weakref.ref(tensor), key, tensor.untyped_storage().nbytes(), self.place))
        return tensor

    def kept(self) -> dict[int | None, int]:
        """Bytes by place of the saved storages alive now, each once, where it was first saved.

        Only live storages are told apart by address: a freed one's address may be reused by the next.
        """
        first: dict[int, tuple[int | None, int]] = {}
        for ref, key, nbytes, place in self.entries:
            if ref() is not None:
                first.setdefault(key, (place, nbytes))
        by_place: dict[int | None, int] = {}
        for place, nbytes in first.values():
            by_place[place] = by_place.get(place, 0) + nbytes
        return by_place


def layer_types(model: torch.nn.Module) -> list[str]:
    """The config's `layer_types` (sliding or full attention, linear attention, ...), empty where it has none."""
    return list(getattr(decoder_of(model).config, "layer_types", None) or [])


def representatives(layers: torch.nn.ModuleList, types: list[str]) -> list[int]:
    """For each layer, the first layer that keeps the same bytes: same modules, parameters and layer type.

    Also whether a trainable layer runs before it, which decides whether its input needs a gradient (frozen
    embeddings: the first layer's LoRA inputs do not, and keep nothing for a weight gradient's sake).
    """
    first: dict[tuple, int] = {}
    chosen, trainable_before = [], False
    for index, layer in enumerate(layers):
        kind = types[index] if index < len(types) else None
        chosen.append(first.setdefault((layer_signature(layer), kind, trainable_before), index))
        trainable_before = trainable_before or any(p.requires_grad for p in layer.parameters())
    return chosen


def layer_signature(layer: torch.nn.Module) -> tuple:
    """What a layer computes and keeps, short of its position: its modules as printed, its tensors' layout."""
    tensors = (*layer.named_parameters(), *layer.named_buffers())
    return repr(layer), tuple((name, t.shape, t.dtype, t.requires_grad) for name, t in tensors)


@contextlib.contextmanager
def only_layers(model: torch.nn.Module, keep: list[int]) -> Iterator[dict[int, torch.nn.Module]]:
    """While open, the decoder holds only its layers at `keep` (in order); yields them by their own index.

    The config's `layer_types` is cut the same way: many decoders pick each layer's mask and rotary embedding
    by its position in that list.
    """
    layers, config = decoder_layers(model), decoder_of(model).config
    everything, types = layers._modules, getattr(config, "layer_types", None)
    layers._modules = {str(slot): everything[str(index)] for slot, index in enumerate(keep)}
    if types:
        config.layer_types = [types[index] for index in keep]
    try:
        yield {index: everything[str(index)] for index in keep}
    finally:
        layers._modules = everything
        if types:
            config.layer_types = types


@contextlib.contextmanager
def watched(layers: dict[int, torch.nn.Module], saved: SavedTensors) -> Iterator[None]:
    """While open, `saved.place` is the index of the decoder layer running, and each layer's input is noted."""
    def enter(index: int, args: tuple, kwargs: dict) -> None:
        saved.place = index
        hidden = args[0] if args else kwargs["hidden_states"]
        saved.inputs[index] = hidden.untyped_storage().nbytes()

    def leave(*_) -> None:
        saved.place = None

    handles = []
    for index, layer in layers.items():
        handles.append(layer.register_forward_pre_hook(
            lambda m, args, kwargs, i=index: enter(i, args, kwargs), with_kwargs=True))
        handles.append(layer.register_forward_hook(leave))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def make_fake(model: torch.nn.Module, mode) -> None:
    """Swap every parameter and buffer of a meta-device `model` for a fake CPU tensor of `mode` (its shape, dtype).

    Tied weights stay one tensor; `requires_grad` is kept.
    """
    cpu, swapped = torch.device("cpu"), {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None and id(param) not in swapped:
                swapped[id(param)] = torch.nn.Parameter(fake_like(mode, param.data, cpu), param.requires_grad)
        module._parameters.update({name: swapped[id(p)] for name, p in module._parameters.items() if p is not None})
        buffers = module._buffers.items()
        module._buffers.update({name: fake_like(mode, b, cpu) for name, b in buffers if b is not None})


def fake_kernel(func, args: tuple, kwargs: dict):
    """An aten operation on fake tensors, called by the trace's dispatch mode (`ftune.compat.dispatch_mode`).

    Where fake tensors cannot compute what the real kernel does, the same shapes and dtypes another way:
    - Boolean-mask indexing, whose result size depends on values fake tensors do not have, is computed as if
      every element were True. The only masks a step reads are of its labels (on CPU the step loss selects the
      learned rows) and every label of the traced batch is learned.
    - Grouped matmuls of MoE experts (`ftune.compat.grouped_mm_op`) in fp32: the CPU kernel computes them, the
      fake one accepts only bf16; computed in bf16 and returned in fp32.

    Both run below autograd: it still sees, and saves, what a real step saves.
    """
    if func is torch.ops.aten.index.Tensor:
        args = (args[0], [every_position(i) if i is not None and i.dtype == torch.bool else i for i in args[1]])
    if func is grouped_mm_op() and args[0].dtype == torch.float32:
        bf16 = [a.to(torch.bfloat16) if i < 2 else a for i, a in enumerate(args)]
        return func(*bf16, **kwargs).to(torch.float32)
    return func(*args, **kwargs)


def every_position(mask: torch.Tensor) -> torch.Tensor:
    """The positions an all-True 1-D `mask` selects (what `mask.nonzero()` would return, flattened)."""
    if mask.dim() != 1:
        raise NotImplementedError(f"boolean index of {mask.dim()} dimensions in a traced step")
    return torch.arange(mask.numel(), device=mask.device)
