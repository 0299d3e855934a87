"""Token-level losses: cross-entropy, and distillation from a teacher.

They return sums, not means: the loop divides by the learned tokens of the whole optimizer step, so every
token weighs the same whatever micro-batch or rank it lands on.
"""

import torch
import torch.nn.functional as F

from ftune.config.schema import DistillCfg
from ftune.data.mask import IGNORE_INDEX

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
"""Batch keys the model reads; packed batches carry position_ids (and a 4D mask, or none for flash-attn)."""


def text_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The logits of the text's own positions: the last `labels.size(1)` of them.

    Prompt tuning prepends virtual tokens to the input, so its logits are longer than the labels by that many
    leading positions, which have no label. For every other method this is the identity.
    """
    return logits[:, logits.size(1) - labels.size(1) :]


def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Align position t's logits with token t+1's label, flattened to (tokens, vocab) and (tokens,)."""
    logits = text_logits(logits, labels)
    return logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1)


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over every label that is not IGNORE_INDEX, computed in fp32."""
    flat_logits, flat_labels = shifted(logits, labels)
    return F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def learned_token_count(labels: torch.Tensor) -> torch.Tensor:
    """How many tokens of a batch carry a loss (the labels after the shift that are not ignored)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def distillation_sums(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, cfg: DistillCfg
) -> dict[str, torch.Tensor]:
    """Distillation loss terms summed over the learned tokens (shifted label not IGNORE_INDEX).

    Per token, with temperature T and weight alpha:
        ce_loss = CE(student, label)
        kd_loss = T^2 * KL(softmax(teacher / T) || softmax(student / T))
        loss    = alpha * ce_loss + (1 - alpha) * kd_loss
    T^2 keeps the KL gradients' scale independent of T (Hinton et al., 2015). Only learned tokens are kept
    before the fp32 upcast, so prompts and padding cost no memory here.

    Args:
        student_logits: (batch, positions, vocab); prompt tuning's extra leading positions are dropped.
        teacher_logits: (batch, length, vocab) for the same inputs.
        labels: (batch, length) with IGNORE_INDEX where nothing is learned.
        cfg: alpha and temperature.

    Returns:
        `loss`, `ce_loss` and `kd_loss`, each a sum over the learned tokens.
    """
    student, flat_labels = shifted(student_logits, labels)
    teacher, _ = shifted(teacher_logits, labels)
    learned = flat_labels != IGNORE_INDEX
    student, teacher, targets = student[learned].float(), teacher[learned].float(), flat_labels[learned]
    temperature = cfg.temperature
    ce = F.cross_entropy(student, targets, reduction="sum")
    kl = F.kl_div(
        F.log_softmax(student / temperature, dim=-1),
        F.log_softmax(teacher / temperature, dim=-1),
        reduction="sum",
        log_target=True,
    )
    kd = temperature**2 * kl
    return {"loss": cfg.alpha * ce + (1 - cfg.alpha) * kd, "ce_loss": ce, "kd_loss": kd}


def step_loss(model, batch: dict, model_inputs: dict, teacher=None, distill=None) -> dict[str, torch.Tensor]:
    """Summed loss terms of one micro-batch; `loss` is what is backpropagated.

    Plain fine-tuning has only `loss` (the cross-entropy). Distillation (a teacher and `DistillCfg`) adds
    `ce_loss` and `kd_loss`, each summed over the learned tokens, so the loop normalises all terms alike.
    """
    logits = model(**model_inputs).logits
    if teacher is None:
        return {"loss": cross_entropy_sum(logits, batch["labels"])}
    with torch.no_grad():  # the teacher only supplies targets: no graph, no activations kept
        teacher_logits = teacher(**model_inputs).logits
    return distillation_sums(logits, teacher_logits, batch["labels"], distill)
