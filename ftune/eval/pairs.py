"""Held-out preference pairs scored by any model, for `ftune eval`'s rows side by side (base, SFT, DPO, ...).

Each model gives every pair the summed log-probability of its chosen and of its rejected response (the tokens a
DPO run learns: `ftune.data.preference` builds the same rows). A model's row says how often it prefers the chosen
response outright (`pair_accuracy`) and by how much (`pair_margin`); against the reference row (the base), how
often its log-ratio favours the chosen one (`reward_accuracy`, the sign of DPO's implicit reward margin whatever
beta: what a run logs as `eval_reward_accuracy` when its reference is that base).
"""

import torch

from ftune.config.schema import DataCfg
from ftune.data.formats import read_records, resolve_format
from ftune.data.preference import OBJECTIVE_FORMATS, PAIRED_FORMATS, build_preference_loader, build_preference_split
from ftune.errors import DataError
from ftune.eval.loss import unfused_sequence_logps


def holds_pairs(cfg: DataCfg) -> bool:
    """Whether `data.eval_path` holds preference pairs (with `data.format=auto`, as its first record says).

    Raises:
        DataError: it holds KTO's unpaired rows, which ftune eval does not score (nor read as conversations).
    """
    fmt = resolve_format(read_records(cfg.eval_path, cfg), cfg.eval_path, cfg.format)
    if fmt not in PAIRED_FORMATS and fmt in OBJECTIVE_FORMATS["kto"]:
        raise DataError(f"data.eval_path={cfg.eval_path}: unpaired preference rows (prompt, completion, label: "
                        "KTO's data), which ftune eval does not score (expected conversations or preference pairs)",
                        "give the held-out pairs or conversations, or pass KTO rows to ftune train objective=kto")
    return fmt in PAIRED_FORMATS


@torch.no_grad()
def pair_logps(model, tokenizer, cfg: DataCfg, batch_size: int) -> torch.Tensor:
    """`[pairs, 2]`: each held-out pair's summed log-probability of its chosen and of its rejected response."""
    rows, _ = build_preference_split(cfg, tokenizer, split="eval", formats=PAIRED_FORMATS)
    loader = build_preference_loader(rows, batch_size, tokenizer.pad_token_id, shuffle=False)
    scores = []
    for batch in loader:
        sums = torch.stack([sequence_logp(model, ids, mask, labels) for ids, mask, labels in
                            zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True)])
        scores.append(torch.stack(sums.chunk(2), dim=1))  # rows 0..B-1 chosen, B..2B-1 rejected
    return torch.cat(scores)


def sequence_logp(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One sequence's summed log p of its labelled tokens, as training's unfused path computes it.

    One row at a time, so the largest tensor is one sequence's logits, whatever the vocabulary and the batch.
    """
    device = model.device
    logits = model(input_ids=ids[None].to(device), attention_mask=mask[None].to(device)).logits
    return unfused_sequence_logps(logits, labels[None].to(device))[0].cpu()


def pair_metrics(logps: torch.Tensor) -> dict[str, float]:
    """How often and by how much a model prefers the chosen responses (no reference)."""
    margin = logps[:, 0] - logps[:, 1]
    return {"pair_accuracy": (margin > 0).float().mean().item(), "pair_margin": margin.mean().item(),
            "pairs": logps.size(0)}


def reward_accuracy(logps: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of pairs whose chosen response gained more log-probability over the reference than the rejected."""
    gained = logps - reference
    return (gained[:, 0] > gained[:, 1]).float().mean().item()
