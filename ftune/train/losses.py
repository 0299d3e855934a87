"""Token losses (cross-entropy, distillation) and sequence log-probs (`SequenceLogps`), each built once at setup.

They return sums, not means: the loop divides by the learned tokens of the whole optimizer step, so every
token weighs the same whatever micro-batch or rank it lands on.

By default (`trainer.loss_chunk_size` > 0) the step's loss never materialises the `[tokens, vocab]` logits:
the head and the loss run chunk by chunk over the last hidden states (`train/chunked.py`, `train/head.py`).
The unfused definition on full logits (`ftune.eval.loss.cross_entropy_sum`, and distillation below) is used with
`trainer.loss_chunk_size=0` and for heads the chunked path cannot take apart.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ftune.config.schema import DistillCfg, TrainerCfg
from ftune.data.mask import IGNORE_INDEX
from ftune.eval.loss import cross_entropy_sum, model_inputs, shifted, text_logits, unfused_token_logps
from ftune.model.dtypes import DTYPES
from ftune.train.chunked import ChunkSpec, chunked_loss, chunked_token_logps
from ftune.train.head import captured_head_input, linear_head, unsupported_reason


def distillation_sums(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, cfg: DistillCfg,
    vocab: int | None = None,
) -> dict[str, torch.Tensor]:
    """Distillation loss terms summed over the learned tokens (shifted label not IGNORE_INDEX).

    Per token, with temperature T and weight alpha:
        ce_loss = CE(student, label)
        kd_loss = T^2 * KL(softmax(teacher[:vocab] / T) || softmax(student[:vocab] / T))
        loss    = alpha * ce_loss + (1 - alpha) * kd_loss
    T^2 keeps the KL gradients' scale independent of T (Hinton et al., 2015). Only learned tokens are kept
    before the fp32 upcast, so prompts and padding cost no memory here.

    Args:
        student_logits: (batch, positions, vocab); prompt tuning's extra leading positions are dropped.
        teacher_logits: (batch, length, vocab) for the same inputs.
        labels: (batch, length) with IGNORE_INDEX where nothing is learned.
        cfg: alpha and temperature.
        vocab: the KL compares the first `vocab` logits of both (the tokenizer's vocabulary: embedding rows
            past it are padding, and the two models may pad differently); None compares the common width.

    Returns:
        `loss`, `ce_loss` and `kd_loss`, each a sum over the learned tokens.
    """
    student, flat_labels = shifted(student_logits, labels)
    teacher, _ = shifted(teacher_logits, labels)
    learned = flat_labels != IGNORE_INDEX
    student, teacher, targets = student[learned].float(), teacher[learned].float(), flat_labels[learned]
    temperature = cfg.temperature
    ce = F.cross_entropy(student, targets, reduction="sum")
    vocab = vocab or min(student.size(-1), teacher.size(-1))
    kl = F.kl_div(
        F.log_softmax(student[:, :vocab] / temperature, dim=-1),
        F.log_softmax(teacher[:, :vocab] / temperature, dim=-1),
        reduction="sum",
        log_target=True,
    )
    kd = temperature**2 * kl
    return {"loss": cfg.alpha * ce + (1 - cfg.alpha) * kd, "ce_loss": ce, "kd_loss": kd}


@dataclass(frozen=True)
class StepLoss:
    """The loss of one micro-batch, `loss(model, batch) -> sums`, built once at setup by `build_step_loss`.

    `loss` is what is backpropagated. Plain fine-tuning returns only `loss` (the cross-entropy); distillation
    adds `ce_loss` and `kd_loss`, each summed over the learned tokens, so the loop normalises all terms alike.
    """

    head: torch.nn.Module | None
    """The student's output head (unwrapped) when the loss is chunked; None computes the full logits."""
    spec: ChunkSpec
    dtype: torch.dtype | None = None
    """The head's matmul dtype: the autocast dtype under mixed precision (the loss runs outside autocast)."""
    teacher: torch.nn.Module | None = None
    distill: DistillCfg | None = None
    vocab: int | None = None
    """The tokenizer's vocabulary size: the KL compares the heads' first `vocab` rows."""

    def __call__(self, model, batch: dict) -> dict[str, torch.Tensor]:
        inputs, labels = model_inputs(batch), batch["labels"]
        if self.head is None:
            return self.unfused(model, inputs, labels)
        hidden = head_input(model, self.head, inputs)
        rows, targets, learned = shifted_rows(hidden, labels)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():  # the teacher only supplies targets: no graph, no activations kept
                teacher_rows = shifted_rows(head_input(self.teacher, output_head(self.teacher), inputs), labels,
                                            learned)[0]
            teacher = linear_head(output_head(self.teacher), teacher_rows, None)
        return chunked_loss(linear_head(self.head, rows, self.dtype), targets, self.spec, teacher)

    def unfused(self, model, inputs: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The loss from the full logits."""
        logits = model(**inputs).logits
        if self.teacher is None:
            return {"loss": cross_entropy_sum(logits, labels)}
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        return distillation_sums(logits, teacher_logits, labels, self.distill, self.vocab)

    def without_teacher(self) -> "StepLoss":
        """The plain cross-entropy computed the same way: what evaluation measures."""
        return dataclasses.replace(self, spec=dataclasses.replace(self.spec, alpha=1.0), teacher=None, distill=None)


UNFUSED = StepLoss(None, ChunkSpec(0))
"""The plain cross-entropy from the full logits (tests compare the chunked loss against it)."""


def build_step_loss(model, trainer: TrainerCfg, teacher=None, distill: DistillCfg | None = None,
                    vocab: int | None = None) -> StepLoss:
    """The step's loss function for this run: chunked over the head unless it is off or cannot be.

    Args:
        model: the student, unwrapped (its head is taken apart by `train/head.py`).
        trainer: `loss_chunk_size`, `loss_recompute` and `mixed_precision`.
        teacher: the frozen distillation teacher, or None.
        distill: alpha and temperature (with a teacher).
        vocab: the tokenizer's vocabulary size (distillation compares that many rows of both heads).

    Returns:
        The loss; with a head the chunked path cannot take apart, or `loss_chunk_size=0`, the unfused one.
    """
    head = output_head(model)
    chunked = trainer.loss_chunk_size > 0 and unsupported_reason(head) is None \
        and (teacher is None or unsupported_reason(output_head(teacher)) is None)
    spec = ChunkSpec(trainer.loss_chunk_size, trainer.loss_recompute)
    if teacher is not None:
        spec = dataclasses.replace(spec, alpha=distill.alpha, temperature=distill.temperature, vocab=vocab)
    dtype = DTYPES.get(trainer.mixed_precision)  # None for "no"
    return StepLoss(head if chunked else None, spec, dtype, teacher, distill if teacher is not None else None, vocab)


@dataclass(frozen=True)
class SequenceLogps:
    """Each sequence's summed log-probability of its labelled tokens, `sequence_logps(model, batch)`, built at setup.

    What preference objectives compare. Chunked through the head (`chunked_token_logps`) unless the head cannot
    be taken apart or `trainer.loss_chunk_size=0`; then from the full logits. A batch is one sequence per row, or
    (with `logp_source`, the shared-prompt layout of `shared_prompt_rows`) a prompt's responses per row, a pair's
    or a GRPO group's, whose tokens name their sequence.
    """

    head: torch.nn.Module | None
    spec: ChunkSpec
    dtype: torch.dtype | None = None

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probs, labelled tokens), one of each per sequence."""
        if "logp_source" in batch:
            return self.gathered(model, batch)
        return self.per_token(model, batch).sum(1), sequence_token_counts(batch)

    def per_token(self, model, batch: dict) -> torch.Tensor:
        """Each labelled token's log-probability, [rows, length - 1] aligned with `labels[:, 1:]`, 0 where ignored.

        What GRPO's per-token ratios are made of; one sequence per row, or in the shared-prompt layout (with
        `logp_source`) the listed tokens' own, [tokens] aligned with `logp_target` (`gathered_tokens`).
        """
        if "logp_source" in batch:
            return self.gathered_tokens(model, batch)
        inputs, labels = model_inputs(batch), batch["labels"]
        if self.head is None:
            return unfused_token_logps(model(**inputs).logits, labels)
        rows, targets, keep = shifted_rows(head_input(model, self.head, inputs), labels)
        logps = chunked_token_logps(linear_head(self.head, rows, self.dtype), targets, self.spec)
        if keep is not None:  # on CPU only the labelled rows went through the head
            logps = torch.zeros(keep.shape, dtype=logps.dtype, device=logps.device).masked_scatter(keep, logps)
        return logps.view(labels.size(0), -1)

    def gathered(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Shared-prompt pairs: each sequence's sum of its listed tokens' log-probs (`gathered_tokens`)."""
        logps = self.gathered_tokens(model, batch)
        sums = torch.zeros(2 * batch["input_ids"].size(0), dtype=logps.dtype, device=logps.device)
        return sums.index_add(0, batch["logp_slot"], logps), sequence_token_counts(batch)

    def gathered_tokens(self, model, batch: dict) -> torch.Tensor:
        """Shared-prompt rows: each listed token's log p from the hidden state its `logp_source` names, [tokens].

        The indices come from the collator, so nothing here waits on the device to learn how many tokens there are.
        """
        source, targets = batch["logp_source"], batch["logp_target"]
        if self.head is None:
            logits = model(**model_inputs(batch)).logits.flatten(0, 1)[source].float()
            return torch.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        rows = head_input(model, self.head, model_inputs(batch)).flatten(0, 1)[source]
        return chunked_token_logps(linear_head(self.head, rows, self.dtype), targets, self.spec)


def sequence_token_counts(batch: dict) -> torch.Tensor:
    """Labelled tokens per sequence: per row, or two sequences per row in the shared-prompt layout."""
    if "logp_slot" in batch:
        return torch.bincount(batch["logp_slot"], minlength=2 * batch["input_ids"].size(0))
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1)


def build_sequence_logps(model, trainer: TrainerCfg) -> SequenceLogps:
    """Sequence log-probs for `model` (unwrapped): chunked over its head unless it is off or cannot be."""
    head = output_head(model)
    chunked = trainer.loss_chunk_size > 0 and unsupported_reason(head) is None
    spec = ChunkSpec(trainer.loss_chunk_size, trainer.loss_recompute)
    return SequenceLogps(head if chunked else None, spec, DTYPES.get(trainer.mixed_precision))


def output_head(model) -> torch.nn.Module:
    """The model's output layer (through PEFT's wrappers, which forward `get_output_embeddings`)."""
    return model.get_output_embeddings()


def head_input(model, head: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """Run `model` on `inputs` without computing its logits; returns the last hidden states (the head's input)."""
    with captured_head_input(head) as captured:
        model(**inputs)
    return captured[-1]


def shifted_rows(
    hidden: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Hidden rows aligned with their next-token targets, as (tokens, hidden) and (tokens,).

    Prompt tuning's leading virtual positions are dropped (`text_logits`). On CPU only the learned rows are
    kept (`keep`, or computed here and returned for the teacher): the head then does no work on prompts and
    padding. On accelerators every row goes through (ignored ones masked), because selecting them would make
    the host wait for the device to learn how many there are.
    """
    hidden = text_logits(hidden, labels)
    rows, targets = hidden[:, :-1].reshape(-1, hidden.size(-1)), labels[:, 1:].reshape(-1)
    if keep is None and hidden.device.type == "cpu":
        keep = targets != IGNORE_INDEX
    if keep is None:
        return rows, targets, None
    return rows[keep], targets[keep], keep
