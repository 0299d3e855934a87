"""Cross-entropy and distillation losses from the last hidden states, chunk by chunk, never holding the logits.

A `[tokens, vocab]` fp32 logits tensor is gigabytes at today's 128k-256k vocabularies (4 x 4,096 tokens x
128,256 rows x 4 bytes = 8 GiB), and the unfused loss keeps several of them (the 16-bit logits, their fp32
upcast, the log-probabilities saved for the backward, their gradient). Here the head's matmul, the loss and
its gradient run `chunk_size` tokens at a time inside one autograd function, so only one chunk's logits exist
at any moment.

Two ways to get the gradient, chosen by `ChunkSpec.recompute`:
- precomputed (the default, as Liger's fused linear cross-entropy does): each chunk's gradient with respect to
  the logits is computed in the forward pass, right after its loss, and pushed through the head at once
  (input gradient, and weight gradient if the head trains). The backward only scales the stored gradients by
  the incoming scalar. The head's forward matmul is done once.
- recompute: the forward computes only the loss; the backward computes each chunk's logits again. One more
  head matmul per step, but no gradient buffers are held between forward and backward.
Measured by `python scripts/bench.py --only headloss`; docs/benchmarks.md has the figures.

The head is a sum of linear terms (`LinearHead`): `logits = sum_i inputs[i] @ weights[i].T (+ bias)`. A plain
(or tied) head is one term; LoRA on the head adds the term `(lora_A(dropout(h)) * scaling, lora_B.weight)`, so
the adapter trains through the same chunked path (see `train/head.py`). Matmuls run in the `dtype` the model's
autocast would use, the softmax in fp32, as the unfused `F.cross_entropy(logits.float(), ...)` does.
"""

from dataclasses import dataclass

import torch

from ftune.data.mask import IGNORE_INDEX


@dataclass(frozen=True)
class LinearHead:
    """An output layer as a sum of linear terms: logits = sum_i inputs[i] @ weights[i].T (+ bias).

    Every input has the same rows (tokens); every weight has the same number of rows (the head's vocabulary).
    """

    inputs: tuple[torch.Tensor, ...]
    weights: tuple[torch.Tensor, ...]
    bias: torch.Tensor | None = None
    dtype: torch.dtype | None = None
    """The matmuls' dtype (the autocast dtype under mixed precision); None: each weight's own."""

    def tensors(self) -> list[torch.Tensor]:
        """Inputs, weights and bias, in the order `Layout.head` expects them back."""
        return [*self.inputs, *self.weights, *([self.bias] if self.bias is not None else [])]

    def layout(self) -> "Layout":
        """What the head is made of, without its tensors (the autograd context keeps this, not the tensors)."""
        return Layout(len(self.inputs), self.bias is not None, self.dtype)


@dataclass(frozen=True)
class Layout:
    """A `LinearHead` without its tensors: how many terms, whether it has a bias, its matmul dtype."""

    terms: int
    bias: bool
    dtype: torch.dtype | None

    @property
    def size(self) -> int:
        """How many tensors a head of this layout is made of."""
        return 2 * self.terms + self.bias

    def head(self, tensors: list[torch.Tensor]) -> LinearHead:
        """The head made of `tensors`, listed as `LinearHead.tensors` lists them."""
        bias = tensors[2 * self.terms] if self.bias else None
        return LinearHead(tuple(tensors[: self.terms]), tuple(tensors[self.terms : 2 * self.terms]), bias, self.dtype)


@dataclass(frozen=True)
class ChunkSpec:
    """How the loss is computed: chunk size, gradient strategy and, for distillation, its weights."""

    chunk_size: int
    """Tokens per chunk: one chunk's logits (chunk_size x vocab, fp32) is the largest tensor the loss holds."""
    recompute: bool = False
    """Recompute each chunk's logits in the backward instead of computing the gradient in the forward."""
    alpha: float = 1.0
    """Weight of the cross-entropy; (1 - alpha) weighs the KL to the teacher. 1.0 without a teacher."""
    temperature: float = 1.0
    """Softmax temperature of the KL term (scaled back by T^2)."""
    vocab: int | None = None
    """The KL compares the first `vocab` rows of both heads: the shared tokenizer vocabulary, when the
    embedding matrices are padded differently (Qwen2.5: 151,665 tokens in 152,064 rows)."""


def chunked_loss(
    student: LinearHead, targets: torch.Tensor, spec: ChunkSpec, teacher: LinearHead | None = None
) -> dict[str, torch.Tensor]:
    """Summed loss terms over the rows whose target is not IGNORE_INDEX, differentiable through `student`.

    Per token (see `losses.distillation_sums` for the unfused definition):
        ce_loss = CE(student logits, target)
        kd_loss = T^2 * KL(softmax(teacher[:vocab] / T) || softmax(student[:vocab] / T))
        loss    = alpha * ce_loss + (1 - alpha) * kd_loss        (loss = ce_loss without a teacher)

    Args:
        student: the student's head terms over N token rows (the rows already shifted: row t predicts t+1).
        targets: (N,) target ids, IGNORE_INDEX where nothing is learned.
        spec: chunk size, gradient strategy, distillation weights.
        teacher: the teacher's head terms over the same rows (no gradient), for distillation.

    Returns:
        `loss` (differentiable), and with a teacher `ce_loss` and `kd_loss` (not differentiable: for logging).
    """
    tensors = student.tensors() + (teacher.tensors() if teacher is not None else [])
    teacher_layout = teacher.layout() if teacher is not None else None
    loss, ce, kd = _ChunkedLoss.apply(spec, student.layout(), teacher_layout, targets, *tensors)
    return {"loss": loss} if teacher is None else {"loss": loss, "ce_loss": ce, "kd_loss": kd}


class _ChunkedLoss(torch.autograd.Function):
    """The loss of `chunked_loss`; its gradient is exact, computed per chunk in the forward or the backward."""

    @staticmethod
    def forward(ctx, spec, layout, teacher_layout, targets, *tensors):
        student, teacher = split_heads(layout, teacher_layout, tensors)
        needs = ctx.needs_input_grad[4 : 4 + layout.size]
        grads = None if spec.recompute or not any(needs) else gradient_buffers(student, needs)
        sums = run_chunks(student, targets, spec, teacher, grads)
        ctx.spec, ctx.layouts, ctx.needs = spec, (layout, teacher_layout), needs
        ctx.dtypes = [t.dtype for t in tensors[: layout.size]]
        if grads is None:  # recompute (or nothing to differentiate): keep what the backward recomputes from
            ctx.save_for_backward(targets, *tensors)
        else:
            ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.mark_non_differentiable(sums[1], sums[2])
        return sums[0], sums[1], sums[2]

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        spec, needs, (layout, teacher_layout) = ctx.spec, ctx.needs, ctx.layouts
        saved = list(ctx.saved_tensors)
        if spec.recompute:
            student, teacher = split_heads(layout, teacher_layout, saved[1:])
            grads = gradient_buffers(student, needs)
            run_chunks(student, saved[0], spec, teacher, grads)
        else:
            stored = iter(saved)
            grads = [next(stored) if need else None for need in needs]
        # The loss is linear in its scale: the incoming scalar multiplies every stored gradient.
        scaled = [None if g is None else (g * grad_loss).to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)]
        return None, None, None, None, *scaled, *[None] * (teacher_layout.size if teacher_layout else 0)


def split_heads(
    layout: Layout, teacher_layout: Layout | None, tensors
) -> tuple[LinearHead, LinearHead | None]:
    """The student's and the teacher's heads from the function's flat tensor arguments."""
    student = layout.head(list(tensors[: layout.size]))
    return student, teacher_layout.head(list(tensors[layout.size :])) if teacher_layout else None


def gradient_buffers(head: LinearHead, needs: tuple[bool, ...]) -> list[torch.Tensor | None]:
    """Zeroed gradient accumulators for the head's tensors that need one (weights accumulate in fp32)."""
    def buffer(tensor: torch.Tensor, weight: bool) -> torch.Tensor:
        return torch.zeros(tensor.shape, dtype=torch.float32 if weight else tensor.dtype, device=tensor.device)

    kinds = [False] * len(head.inputs) + [True] * (len(head.tensors()) - len(head.inputs))
    return [buffer(t, weight) if need else None
            for t, weight, need in zip(head.tensors(), kinds, needs, strict=True)]


def run_chunks(
    student: LinearHead, targets: torch.Tensor, spec: ChunkSpec, teacher: LinearHead | None,
    grads: list[torch.Tensor | None] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loop over the rows chunk by chunk: summed (loss, ce, kd), and the gradients added into `grads` if given."""
    casts = cast_weights(student)
    teacher_casts = cast_weights(teacher) if teacher is not None else None
    sums = torch.zeros(3, dtype=torch.float32, device=targets.device)
    with torch.no_grad():  # the function differentiates itself; nothing here is recorded
        for start in range(0, targets.numel(), spec.chunk_size):
            rows = slice(start, start + spec.chunk_size)
            logits = head_logits(student, casts, rows)
            teacher_logits = head_logits(teacher, teacher_casts, rows) if teacher is not None else None
            sums += chunk_loss(logits, targets[rows], spec, teacher_logits, grads is not None)
            if grads is not None:  # `logits` now holds their gradient
                add_chunk_gradients(student, casts, rows, logits, grads)
    return sums[0], sums[1], sums[2]


def cast_weights(head: LinearHead) -> list[torch.Tensor]:
    """The weights in the matmul dtype, cast once per call (as autocast caches its weight casts per forward)."""
    return [w if head.dtype is None else w.to(head.dtype) for w in head.weights]


def head_logits(head: LinearHead, casts: list[torch.Tensor], rows: slice) -> torch.Tensor:
    """One chunk's logits in fp32: each term's matmul in the head's dtype, summed in fp32."""
    logits = None
    for x, weight in zip(head.inputs, casts, strict=True):
        part = x[rows].to(weight.dtype) @ weight.T
        logits = part.float() if logits is None else logits.add_(part)
    return logits if head.bias is None else logits.add_(head.bias)


def chunk_loss(
    logits: torch.Tensor, targets: torch.Tensor, spec: ChunkSpec, teacher_logits: torch.Tensor | None,
    want_grad: bool,
) -> torch.Tensor:
    """(loss, ce, kd) sums of one chunk; with `want_grad`, `logits` is overwritten with d loss / d logits.

    d CE / d z = softmax(z) - onehot(target); d KD / d z[:vocab] = T * (softmax(z/T) - softmax(t/T)), zero on
    the student's rows past `vocab`; rows with an ignored target get no loss and no gradient.
    """
    learned = targets != IGNORE_INDEX
    safe = targets.clamp(min=0).unsqueeze(1)
    log_norm = torch.logsumexp(logits, dim=1)
    ce_rows = (log_norm - logits.gather(1, safe).squeeze(1)) * learned
    kd_rows, kd_grad = torch.zeros_like(ce_rows), None
    if teacher_logits is not None:
        kd_rows, kd_grad = distillation_rows(logits, teacher_logits, spec, want_grad)
        kd_rows = kd_rows * learned
    loss_rows = spec.alpha * ce_rows + (1 - spec.alpha) * kd_rows if teacher_logits is not None else ce_rows
    if want_grad:
        grad = logits.sub_(log_norm.unsqueeze(1)).exp_()  # softmax, in the logits' memory
        grad.scatter_add_(1, safe, -torch.ones_like(safe, dtype=grad.dtype))
        if kd_grad is not None:
            grad.mul_(spec.alpha)
            grad[:, : kd_grad.size(1)].add_(kd_grad, alpha=1 - spec.alpha)
        grad.mul_(learned.unsqueeze(1))
    return torch.stack([loss_rows.sum(), ce_rows.sum(), kd_rows.sum()])


def distillation_rows(
    logits: torch.Tensor, teacher_logits: torch.Tensor, spec: ChunkSpec, want_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row T^2 * KL(teacher || student) over the shared vocabulary, and its gradient w.r.t. the student."""
    vocab = spec.vocab or min(logits.size(1), teacher_logits.size(1))
    temperature = spec.temperature
    student_log = torch.log_softmax(logits[:, :vocab] / temperature, dim=1)
    teacher_log = torch.log_softmax(teacher_logits[:, :vocab] / temperature, dim=1)
    teacher_probs = teacher_log.exp()
    kd_rows = temperature**2 * (teacher_probs * (teacher_log - student_log)).sum(1)
    grad = student_log.exp_().sub_(teacher_probs).mul_(temperature) if want_grad else None
    return kd_rows, grad


def add_chunk_gradients(
    head: LinearHead, casts: list[torch.Tensor], rows: slice, grad_logits: torch.Tensor,
    grads: list[torch.Tensor | None],
) -> None:
    """Push one chunk's logits gradient through the head terms into the accumulators.

    The matmuls run in the head's dtype, as the unfused backward of an autocast linear does.
    """
    terms = len(head.inputs)
    grad = grad_logits.to(casts[0].dtype)
    for index, (x, weight) in enumerate(zip(head.inputs, casts, strict=True)):
        if grads[index] is not None:
            grads[index][rows] = grad @ weight
        if (weight_grad := grads[terms + index]) is not None:
            chunk_input = x[rows].to(weight.dtype)
            if weight_grad.dtype == grad.dtype:
                weight_grad.addmm_(grad.T, chunk_input)
            else:  # a 16-bit product, accumulated in fp32
                weight_grad.add_(grad.T @ chunk_input)
    if head.bias is not None and grads[2 * terms] is not None:
        grads[2 * terms].add_(grad_logits.sum(0))


def chunked_token_logps(head: LinearHead, targets: torch.Tensor, spec: ChunkSpec) -> torch.Tensor:
    """The log p(target) of every row (0 where the target is IGNORE_INDEX), differentiable through `head`.

    What preference losses are made of: a sequence's log-probability is the sum of its rows' values, taken by the
    caller, so the backward receives a vector (one weight per row) instead of the scalar `chunked_loss` gets. Each
    row's value depends on its own hidden state only, so when no weight of the head trains (LoRA, QLoRA: the head
    is frozen) the forward stores d logp / d hidden per row and the backward scales those rows; when a weight
    trains (full fine-tuning, `spec.recompute`), the backward recomputes each chunk's logits and pushes the
    weighted gradient through the head as `chunked_loss` does. Either way only one chunk's logits ever exist.
    """
    return _ChunkedTokenLogps.apply(spec, head.layout(), targets, *head.tensors())


class _ChunkedTokenLogps(torch.autograd.Function):
    """Rows' target log-probabilities; the gradient of sum_t g_t logp_t is g_t * (onehot_t - softmax_t) per row."""

    @staticmethod
    def forward(ctx, spec, layout, targets, *tensors):
        head = layout.head(list(tensors))
        needs = ctx.needs_input_grad[3 : 3 + layout.size]
        weights_train = any(needs[layout.terms :])
        grads = None if spec.recompute or weights_train or not any(needs) else gradient_buffers(head, needs)
        logps = torch.zeros(targets.shape, dtype=torch.float32, device=targets.device)
        casts = cast_weights(head)
        with torch.no_grad():
            for start in range(0, targets.numel(), spec.chunk_size):
                rows = slice(start, start + spec.chunk_size)
                logits = head_logits(head, casts, rows)
                logps[rows] = target_logps(logits, targets[rows], want_grad=grads is not None)
                if grads is not None:  # `logits` now holds d logp / d logits of each row
                    add_chunk_gradients(head, casts, rows, logits, grads)
        ctx.spec, ctx.layout, ctx.needs, ctx.dtypes = spec, layout, needs, [t.dtype for t in tensors]
        ctx.stored = grads is not None
        ctx.save_for_backward(*([g for g in grads if g is not None] if ctx.stored else [targets, *tensors]))
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        saved = list(ctx.saved_tensors)
        if ctx.stored:  # per-row input gradients: scale each row by its incoming weight
            stored = iter(saved)
            grads = [(next(stored) * grad_logps.unsqueeze(1).to(torch.float32)) if need else None
                     for need in ctx.needs]
        else:
            targets, head = saved[0], ctx.layout.head(saved[1:])
            grads = gradient_buffers(head, ctx.needs)
            casts = cast_weights(head)
            for start in range(0, targets.numel(), ctx.spec.chunk_size):
                rows = slice(start, start + ctx.spec.chunk_size)
                logits = head_logits(head, casts, rows)
                target_logps(logits, targets[rows], want_grad=True)
                add_chunk_gradients(head, casts, rows, logits.mul_(grad_logps[rows].unsqueeze(1)), grads)
        scaled = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes, strict=True)]
        return None, None, None, *scaled


def target_logps(logits: torch.Tensor, targets: torch.Tensor, want_grad: bool) -> torch.Tensor:
    """One chunk's log p(target) per row (0 on ignored rows); with `want_grad`, `logits` becomes d logp / d logits.

    d logp / d z = onehot(target) - softmax(z), zero on ignored rows.
    """
    learned = targets != IGNORE_INDEX
    safe = targets.clamp(min=0).unsqueeze(1)
    log_norm = torch.logsumexp(logits, dim=1)
    logps = (logits.gather(1, safe).squeeze(1) - log_norm) * learned
    if want_grad:
        grad = logits.sub_(log_norm.unsqueeze(1)).exp_().neg_()  # -softmax, in the logits' memory
        grad.scatter_add_(1, safe, torch.ones_like(safe, dtype=grad.dtype))
        grad.mul_(learned.unsqueeze(1))
    return logps
