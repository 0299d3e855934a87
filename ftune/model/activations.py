"""Activation memory of a Llama-family decoder (Llama, Mistral, Qwen2): what autograd keeps for the backward pass.

The formula follows Korthikanti et al., "Reducing Activation Recomputation in Large Transformer Models" (2022),
which counts, tensor by tensor, what each op of a layer saves for its backward (34·s·b·h bytes per GPT layer in
fp16, plus 5·a·s²·b for the attention scores). Adapted here to what transformers' Llama code and PEFT's LoRA
layers save, measured op by op with `torch.autograd.graph.saved_tensors_hooks` (tests/model/test_plan.py):

per layer and token, with h the hidden size, I the MLP width, a heads, q/kv the query and key-value widths,
e the bytes of the activation dtype (2 under bf16/fp16 autocast or 16-bit weights, else 4), w those of the
residual stream (the embeddings' dtype):
- RMSNorm, x2: its input upcast to fp32 and 1/rms: 2·(4h + 4); with a trainable weight also the normalised
  input in the residual dtype: + 2·w·h.
- attention (SDPA/flash): q, k, v after RoPE and the output, in e, and a fp32 log-sum-exp per head:
  e·(2q + 2kv) + 4a. No s² term: the kernels recompute the scores. `eager` attention keeps the fp32 softmax
  (and under autocast its e-byte copy): + a·s·(4 [+ e]).
- SwiGLU MLP: gate output (SiLU input), SiLU output and up output: 3·m·I, m = e except behind 4-bit layers:
  bitsandbytes returns their output in their input's dtype, the fp32 of the upcast norms (QLoRA).
- trainable base linears (full fine-tuning): each weight's gradient needs its input: q/k/v share one, gate/up
  share one (each linear casts its own copy under autocast: 3 and 2 copies), o_proj reuses the attention
  output, down_proj keeps the gated product: (1|3)·h + (1|2)·h in w (or e), + e·I.
- LoRA on a linear of fan-in n, rank r: dropout keeps its mask, m' bytes per element (bool on CUDA: 1 byte; on
  CPU ftune's SparseDropout keeps the int64 positions of the dropped elements, 8p; torch's CPU dropout, used
  above p = 0.25, a float mask in the adapter dtype) and lora_A its input (in e under autocast, else in the
  fp32 adapter dtype): n·(m' + e'), plus lora_A's output e'·r. Without dropout, lora_A's input is shared by
  modules reading the same tensor unless it had to be cast; so it is with CPU dropout folded into lora_A
  (vanilla LoRA, p <= 0.25: `DroppedLinear` keeps the undropped input and the positions, n·m' more). Under
  autocast PEFT's layer casts its input to the fp32 adapter dtype and lora_A casts it back, a copy even of
  a 16-bit input; `FusedLoraLinear` casts once, so o_proj's 16-bit input is the attention output SDPA keeps.
- IA3 keeps what it rescales: the fp32-upcast input of a feed-forward projection (4·n), else the projection's
  output (e·n_out).
Per forward, not per token: under autocast, a 16-bit copy of every floating weight not already in that dtype
(autocast's weight cache, kept until the backward). Head: the final norm, then
- with the chunked loss (`trainer.loss_chunk_size` > 0, `train/chunked.py`): one w·h tensor per token, the
  loss's gradient with respect to the hidden states computed in the forward (or, with `loss_recompute`, the
  hidden states kept to recompute the logits from);
- with the unfused loss: lm_head's input if it trains, and the fp32 log-probabilities of the loss: 4·V (three
  such tensors when distilling: CE, and the student's and the teacher's tempered log-softmax of the KL term).
The logits themselves are transient, counted apart by `logits_bytes`.

With gradient checkpointing only each layer's input is kept (w·h per layer and token), plus, during the
backward, one layer's working set as above.

Not counted: transient buffers (the logits before the loss, gradients in flight), the attention mask of
padded batches (one b·s·s bool tensor shared by all layers), allocator fragmentation and the CUDA context.
"""

from dataclasses import dataclass

FP32 = 4
"""Bytes of the fp32 tensors that norms, softmax statistics and the loss keep whatever the compute dtype."""
INPUT_GROUPS = {
    "q_proj": "attention_input",
    "k_proj": "attention_input",
    "v_proj": "attention_input",
    "o_proj": "attention_output",
    "gate_proj": "mlp_input",
    "up_proj": "mlp_input",
    "down_proj": "mlp_product",
}
"""Llama-family projection -> the tensor it reads; projections reading one tensor can share its saved copy."""
SAVED_ELSEWHERE = frozenset({"attention_output"})
"""Inputs the layer keeps anyway (SDPA saves its output), so a linear reading them adds nothing uncast."""


@dataclass(frozen=True)
class Shape:
    """The dimensions of the decoder that activations scale with."""

    hidden: int
    intermediate: int
    q_dim: int
    kv_dim: int
    heads: int
    vocab: int


@dataclass(frozen=True)
class Precision:
    """Bytes per element of the tensors a step keeps."""

    act: int
    """Outputs of matmuls: the autocast dtype, or the weights' dtype without autocast."""
    mlp: int
    """The MLP's intermediate tensors: `act`, or the norms' output dtype behind 4-bit projections."""
    residual: int
    """The residual stream between layers (the embeddings' dtype)."""
    adapter: int
    """What LoRA's matmuls read: the autocast dtype, or the adapters' own (fp32) dtype."""
    autocast: bool


@dataclass(frozen=True)
class LoraSite:
    """One LoRA-adapted linear of a layer."""

    name: str
    fan_in: int
    rank: int
    dropout_mask: float
    """Bytes per input element the LoRA dropout keeps for the backward (0: no dropout)."""
    dropped_copy: bool = True
    """Whether lora_A keeps its own dropped copy of the input (not where the dropout is folded into lora_A)."""
    fused: bool = False
    """Computed by `FusedLoraLinear` (model/lora_linear.py): its input is not cast through the adapter dtype."""


@dataclass(frozen=True)
class Ia3Site:
    """One IA3-rescaled linear: its input (feed-forward projections) or its output is scaled."""

    width: int
    """Features of the scaled tensor: the fan-in when `feedforward`, else the fan-out."""
    feedforward: bool


@dataclass(frozen=True)
class LayerTraining:
    """What trains in one decoder layer, which decides what its ops must keep."""

    linears: bool
    """The base projections' weights train (full fine-tuning)."""
    norms: bool
    loras: tuple[LoraSite, ...] = ()
    ia3: tuple[Ia3Site, ...] = ()


def layer_token_bytes(shape: Shape, prec: Precision, layer: LayerTraining, seq_len: int, eager: bool) -> float:
    """Bytes one decoder layer keeps per token (see the module docstring for each term)."""
    h = shape.hidden
    norms = 2 * (FP32 * h + FP32) + (2 * prec.residual * h if layer.norms else 0)
    attention = prec.act * (2 * shape.q_dim + 2 * shape.kv_dim) + FP32 * shape.heads
    if eager:  # the softmax kept instead of a log-sum-exp, plus its cast copy under autocast
        attention += shape.heads * seq_len * (FP32 + (prec.act if prec.act != FP32 else 0)) - FP32 * shape.heads
    mlp = 3 * prec.mlp * shape.intermediate
    linear_inputs = full_linear_input_bytes(shape, prec) if layer.linears else 0
    ia3 = sum(site.width * (FP32 if site.feedforward else prec.act) for site in layer.ia3)
    return norms + attention + mlp + linear_inputs + lora_bytes(shape, prec, layer.loras) + ia3


def full_linear_input_bytes(shape: Shape, prec: Precision) -> float:
    """Inputs the trainable q/k/v, gate/up and down projections keep for their weights' gradients."""
    h = shape.hidden
    cast = prec.autocast and prec.act != prec.residual  # each linear keeps its own autocast copy
    return (3 + 2) * prec.act * h + prec.act * shape.intermediate if cast else \
        2 * prec.residual * h + prec.act * shape.intermediate


def lora_bytes(shape: Shape, prec: Precision, sites: tuple[LoraSite, ...]) -> float:
    """What LoRA's dropout, lora_A and lora_B keep for the adapters' gradients, per token."""
    total, shared = 0.0, set()
    uncast = not prec.autocast and prec.adapter == prec.residual
    for site in sites:
        total += prec.adapter * site.rank + site.fan_in * site.dropout_mask
        if site.dropout_mask and site.dropped_copy:
            total += site.fan_in * prec.adapter
            continue
        group = INPUT_GROUPS.get(site.name, site.name)
        # PEFT casts a 16-bit input to the fp32 adapter dtype and autocast back, a copy; the fused layer does not
        kept_anyway = group in SAVED_ELSEWHERE and (uncast or (site.fused and prec.act == prec.adapter))
        if kept_anyway or (uncast and group in shared):
            continue
        shared.add(group)
        total += prec.adapter * site.fan_in
    return total


def head_token_bytes(shape: Shape, prec: Precision, head_trains: bool, norm_trains: bool, distill: bool,
                     chunked: bool) -> float:
    """Bytes per token kept by the final norm, the output head and the loss (see the module docstring)."""
    h = shape.hidden
    norm = FP32 * h + FP32 + (prec.residual * h if norm_trains else 0)
    if chunked:
        return norm + prec.residual * h
    head_input = (prec.act if prec.autocast else prec.residual) * h if head_trains else 0
    log_probs = (3 if distill else 1) * FP32 * shape.vocab
    return norm + head_input + log_probs


def logits_bytes(shape: Shape, prec: Precision, tokens: int, chunk: int, distill: bool, head_trains: bool) -> float:
    """The loss's transient logits at their largest: the whole micro-batch's, or one chunk's.

    Unfused: the head's output in the matmul dtype and its fp32 upcast (the saved log-probabilities are
    activations). Chunked, per token of a chunk: the fp32 logits and logsumexp's fp32 temporary, plus under
    autocast the 16-bit matmul output and the 16-bit gradient fed to the backward matmuls; distillation adds
    the teacher's logits and the two tempered log-softmaxes and the teacher's probabilities (4 fp32 tensors).
    With a trainable head the chunked loss also accumulates the head's weight gradient in fp32 (V·h·4).
    """
    cast = prec.act if prec.act != FP32 else 0
    if chunk == 0:
        return tokens * shape.vocab * (cast + FP32) * (2 if distill else 1)
    per_element = 2 * FP32 + 2 * cast + (4 * FP32 if distill else 0)
    weight_grad = FP32 * shape.vocab * shape.hidden if head_trains else 0
    return min(chunk, tokens) * shape.vocab * per_element + weight_grad


def activation_bytes(
    shape: Shape,
    prec: Precision,
    layers: list[LayerTraining],
    head: float,
    tokens: int,
    seq_len: int,
    eager: bool,
    checkpointing: bool,
) -> float:
    """Activation bytes of one micro-batch of `tokens` tokens (micro batch x sequence length).

    Args:
        shape: the decoder's dimensions.
        prec: bytes of the kept tensors.
        layers: what trains in each decoder layer.
        head: `head_token_bytes` of the model.
        tokens: micro_batch_size x seq_len.
        seq_len: tokens per sequence (eager attention keeps a seq_len x seq_len softmax).
        eager: eager attention instead of SDPA/flash.
        checkpointing: gradient checkpointing (only layer inputs kept, one layer recomputed at a time).

    Returns:
        Bytes, not counting autocast's weight copies (`autocast_copy_bytes`).
    """
    per_layer = [layer_token_bytes(shape, prec, layer, seq_len, eager) for layer in layers]
    if checkpointing:
        kept = len(layers) * prec.residual * shape.hidden + max(per_layer, default=0)
    else:
        kept = sum(per_layer)
    return tokens * (kept + head)
