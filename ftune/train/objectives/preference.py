"""Preference objectives: `dpo` (pairs; DPO and its family, `pref.loss`) and `kto` (unpaired, labelled rows).

Batches come from `ftune.data.preference`: a pair batch holds each pair in one row, its prompt once and both
responses after it (`pref.share_prompt`, where the model passes its probe: `prompt_sharing_problem`), or every
pair's prompt + chosen in rows 0..B-1 and prompt + rejected in rows B..2B-1; either way both sequences of every
pair go through one forward. Each response's log-probability is summed through the chunked head
(`train/losses.SequenceLogps`), so no [tokens, vocab] logits exist for either. The losses are TRL's
(`pair_losses`). Sums are over pairs (or KTO's completions): the step divides them by the pairs of the whole step
on every rank, so metrics are means over all of them.

The reference is the model the policy starts from (`Reference`); it runs without gradient, in the same forward
shape, or once before the first step (`PrecomputedReference`). Dropout is off in both unless `pref.dropout`, so
at step 0 the policy equals the reference.
"""

import dataclasses
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import reduce, send_to_device

from ftune.atomic import atomic_file
from ftune.cache import cache_dir, file_signature, fingerprint
from ftune.data.collate import PairCollator, pad_multiple
from ftune.data.preference import OBJECTIVE_FORMATS, PairRows, build_preference_loader, build_preference_split
from ftune.eval.probe import base_signature
from ftune.model.dropout import disable_dropout, eval_mode
from ftune.model.load import REFERENCE_ADAPTER, load_frozen
from ftune.train.isolation import prompt_sharing_problem
from ftune.train.losses import build_sequence_logps, build_step_loss, sequence_token_counts
from ftune.train.objectives.base import Objective
from ftune.train.objectives.pair_losses import PairLogps, kto_losses, pair_losses


class Reference:
    """The reference model's log-probs, from the policy itself (adapter off, or the frozen start adapter) or a copy.

    - an adapter method without `model.adapter`: the policy with its adapter disabled (the base), no second copy;
    - an adapter method with `model.adapter`: the frozen copy of that adapter (`REFERENCE_ADAPTER`), switched in
      for the reference pass, so the reference is the model training starts from, never the bare base;
    - full fine-tuning: a frozen copy of the base, loaded once.
    """

    def __init__(self, policy, frozen_copy=None, trainer=None):
        self.policy, self.copy = policy, frozen_copy
        self.logps = build_sequence_logps(frozen_copy if frozen_copy is not None else policy, trainer)

    def describe(self) -> str:
        if self.copy is not None:
            return "a frozen copy of the base"
        if REFERENCE_ADAPTER in getattr(self.policy, "peft_config", {}):
            return "the base with model.adapter (frozen copy of the start adapter)"
        return "the base (the policy with its adapter disabled)"

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probs, labelled tokens) per sequence under the reference; `model` is the (wrapped) policy."""
        return self.scored(self.logps, model, batch)

    def per_token(self, model, batch: dict) -> torch.Tensor:
        """Each labelled token's log-prob under the reference (`SequenceLogps.per_token`): GRPO's KL term."""
        return self.scored(self.logps.per_token, model, batch)

    @torch.no_grad()
    def scored(self, logps, model, batch: dict):
        """`logps(reference, batch)`: on the frozen copy, or on the policy switched to the reference."""
        if self.copy is not None:
            return logps(self.copy, batch)
        with self.switched():
            return logps(model, batch)

    def switched(self) -> AbstractContextManager:
        """The policy turned into the reference for one forward."""
        if REFERENCE_ADAPTER in self.policy.peft_config:
            return adapter_switched(self.policy, REFERENCE_ADAPTER)
        return self.policy.disable_adapter()


class PrecomputedReference:
    """The reference's log-probs of every pair, computed once with the weights training starts from.

    `pref.reference=precompute`: each pair batch carries its rows' indices (`row`, from `PairRows`), and the table
    holds each row's (chosen, rejected) sums, train rows first, then held-out ones. It is computed before a
    checkpoint's weights are loaded and cached by model and data (`reference_key`): a resumed run and the next
    run with the same start read it back.
    """

    def __init__(self, table: torch.Tensor, path: Path, from_cache: bool):
        self.table, self.path, self.from_cache = table, path, from_cache  # on the device the batches are on

    def describe(self) -> str:
        return f"precomputed log-probs of the start model ({'read from' if self.from_cache else 'cached in'} " \
               f"{self.path})"

    def __call__(self, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probs, labelled tokens) per sequence of the pair batch, looked up by its pairs' rows."""
        chosen, rejected = self.table[batch["row"]].unbind(1)
        return torch.cat([chosen, rejected]), sequence_token_counts(batch)


@torch.no_grad()
def reference_table(logps, model, rows: PairRows, batch_size: int, collate: PairCollator, device) -> torch.Tensor:
    """Every row's (chosen, rejected) summed log-probs under `model` as it is now, in eval mode, [rows, 2]."""
    table = torch.zeros(len(rows), 2)
    with eval_mode(model):
        for batch in build_preference_loader(rows, batch_size, collate.pad_token_id, shuffle=False, collate=collate):
            batch = send_to_device(batch, device)
            sums, _ = logps(model, batch)
            table[batch["row"].cpu() - rows.first_row] = torch.stack(sums.float().chunk(2), dim=1).cpu()
    return table


def reference_key(cfg, rows: list[PairRows], layout: str | None) -> str:
    """What the precomputed reference depends on: the base, the start adapter, quantization, precision, the data.

    And the batch layout (`PairCollator.shared_mask`): one row per pair or two give sums apart by rounding.
    """
    adapter = cfg.model.adapter
    start = file_signature(Path(adapter) / "adapter_model.safetensors") if adapter else None
    return fingerprint(base_signature(cfg.model), start, dataclasses.asdict(cfg.quant), cfg.method.name,
                       cfg.trainer.mixed_precision, cfg.trainer.loss_chunk_size, [r.key for r in rows], layout)


class adapter_switched(AbstractContextManager):  # noqa: N801 (used as a context manager, like nullcontext)
    """Run with another loaded adapter active, then the trained one again (as it was, trainable)."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name

    def __enter__(self):
        self.previous = self.model.active_adapter
        self.model.set_adapter(self.name, inference_mode=True)

    def __exit__(self, *exc):
        self.model.set_adapter(self.previous)  # PEFT makes the adapter it activates trainable again
        return False


class PreferenceObjective(Objective):
    """What `dpo` and `kto` share: the preference loaders, the policy's log-probs, the reference, no dropout."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.frozen_copy = None
        self.policy_logps = self.reference = None
        self.splits: list[PairRows] = []  # train, then held-out: what a precomputed reference covers
        self.collator: PairCollator | None = None  # both loaders' (DPO): its layout is set when the model attaches
        self.unshared_because: str | None = None  # why DPO's pairs keep two rows (`prompt_sharing_problem`)

    @property
    def needs_reference_adapter(self) -> bool:
        return self.cfg.keeps_reference_model

    def build_loaders(self, tokenizer, accelerator: Accelerator) -> tuple[dict, dict]:
        cfg, batch = self.cfg, self.cfg.trainer.micro_batch_size
        multiple = pad_multiple(cfg.data.pad_to_multiple_of)
        formats = OBJECTIVE_FORMATS[cfg.objective.name]  # DPO reads pairs, KTO unpaired rows: each refuses the other
        train, train_stats = build_preference_split(cfg.data, tokenizer, split="train", formats=formats)
        self.splits = [train]
        if cfg.objective.name == "dpo":
            self.collator = PairCollator(tokenizer.pad_token_id, multiple)
        loaders = {"train": build_preference_loader(train, batch, tokenizer.pad_token_id, shuffle=True, seed=cfg.seed,
                                                    group_by_length=cfg.data.group_by_length,
                                                    pad_to_multiple_of=multiple, workers=cfg.trainer.num_workers,
                                                    collate=self.collator),
                   "eval": None}
        stats = {"train": train_stats, "eval": None}
        if cfg.data.eval_path:
            held_out, stats["eval"] = build_preference_split(cfg.data, tokenizer, split="eval", formats=formats)
            held_out = dataclasses.replace(held_out, first_row=len(train))  # one reference table for both
            self.splits.append(held_out)
            loaders["eval"] = build_preference_loader(held_out, batch, tokenizer.pad_token_id, shuffle=False,
                                                      pad_to_multiple_of=multiple, collate=self.collator)
        return loaders, stats

    def load_frozen(self) -> None:
        """Full fine-tuning's reference: a frozen copy of the base (adapter methods and a precomputed one need none)."""
        if self.cfg.keeps_reference_model and self.cfg.method.name == "full":
            self.frozen_copy = load_frozen(self.cfg.model, "model.name_or_path")

    def attach(self, model, tokenizer) -> None:
        if not self.cfg.pref.dropout:
            disable_dropout(model)
        self.policy_logps = build_sequence_logps(model, self.cfg.trainer)
        self.reference = Reference(model, self.frozen_copy, self.cfg.trainer) if self.cfg.keeps_reference_model \
            else None
        self.token_loss = build_step_loss(model, self.cfg.trainer)
        if self.collator is not None:
            self.unshared_because = prompt_sharing_problem(self.cfg, model, self.policy_logps, self.collator)
            if self.unshared_because is None:
                self.collator.shared_mask = self.cfg.model.attn_implementation

    def start(self, model, accelerator: Accelerator) -> None:
        """`pref.reference=precompute`: the reference table, from the cache or computed now, on every rank.

        Every rank computes the whole table (the same forwards): simpler than sharding and gathering it, and paid
        once per model and data. Only the main process writes the cache file.
        """
        if self.cfg.pref.reference != "precompute":
            return
        layout = self.collator.shared_mask if self.collator is not None else None
        path = cache_dir("reference") / f"{reference_key(self.cfg, self.splits, layout)}.pt"
        if path.is_file():
            self.reference = PrecomputedReference(torch.load(path).to(accelerator.device), path, from_cache=True)
            return
        batch = self.cfg.trainer.micro_batch_size
        table = torch.cat([reference_table(self.policy_logps, model, rows, batch, self.collator, accelerator.device)
                           for rows in self.splits])
        if accelerator.is_main_process:
            with atomic_file(path) as staging:
                torch.save(table, staging)
        self.reference = PrecomputedReference(table.to(accelerator.device), path, from_cache=False)

    def describe(self) -> dict[str, str]:
        pref = self.cfg.pref
        reference = self.reference.describe() if self.reference is not None else "none (reference-free loss)"
        loss = "kto" if self.cfg.objective.name == "kto" else pref.loss
        rows = {"loss": f"{loss} (beta {pref.beta})", "reference": reference,
                "dropout": "on" if pref.dropout else "off (policy = reference at step 0)"}
        if self.collator is not None:  # pairs (KTO's rows hold one response each)
            rows["prompt"] = "once per pair (one row: prompt, chosen, rejected)" if self.unshared_because is None \
                else f"repeated for each response ({self.unshared_because})"
        return super().describe() | rows

    def scored(self, model, batch: dict):
        """(policy, reference) sequences' (log-prob sums, labelled tokens); the reference is None when not used.

        The reference runs first: an MoE model's router loss (`ftune.model.moe`) reads the router logits of the
        latest forward, which must be the policy's, with their gradient.
        """
        reference = self.reference(model, batch) if self.reference is not None else None
        return self.policy_logps(model, batch), reference


class DpoObjective(PreferenceObjective):
    """`objective=dpo`: one loss per pair (`pref.loss`), summed over pairs."""

    count_name = "pairs"

    def count(self, batch: dict) -> torch.Tensor:
        return batch["num_pairs"]

    def loss(self, model, batch: dict) -> dict[str, torch.Tensor]:
        policy, reference = self.scored(model, batch)
        policy_pairs = as_pairs(*policy)
        terms = pair_losses(self.cfg.pref, policy_pairs, as_pairs(*reference) if reference is not None else None)
        chosen, rejected = terms["reward_chosen"], terms["reward_rejected"]
        per_pair = {
            "loss": terms["loss"],
            "reward_chosen": chosen,
            "reward_rejected": rejected,
            "reward_margin": chosen - rejected,
            "reward_accuracy": (chosen > rejected).float(),
            "logp_chosen": policy_pairs.chosen.detach(),
            "logp_rejected": policy_pairs.rejected.detach(),
        }
        return {key: value.sum() for key, value in per_pair.items()}


def as_pairs(logps: torch.Tensor, tokens: torch.Tensor) -> PairLogps:
    """Rows 0..B-1 (chosen) and B..2B-1 (rejected) of a pair batch as pairs."""
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = tokens.chunk(2)
    return PairLogps(chosen, rejected, chosen_tokens, rejected_tokens)


class KtoObjective(PreferenceObjective):
    """`objective=kto`: TRL's KTO loss per completion, against the batch's KL estimate.

    The KL estimate is TRL's: the mean over the micro-batch (and every rank) of policy minus reference log-probs
    of each prompt followed by another row's completion (the collator's `kl_*` rows), detached, clamped at 0.
    `reward_accuracy` is the share of completions whose reward has their label's sign (KTO has no pairs to
    compare); reward means are over the desirable and the undesirable completions respectively.
    """

    count_name = "completions"

    def count(self, batch: dict) -> torch.Tensor:
        return torch.tensor(batch["kto_label"].numel(), device=batch["kto_label"].device)

    def loss(self, model, batch: dict) -> dict[str, torch.Tensor]:
        kl = self.kl_estimate(model, batch)  # first: the policy's forward on the batch is the last (see `scored`)
        (policy, _), (reference, _) = self.scored(model, batch)
        desirable = batch["kto_label"]
        terms = kto_losses(self.cfg.pref, policy, reference, desirable, kl)
        reward, undesirable = terms["reward"], ~desirable
        return {
            "loss": terms["loss"].sum(),
            "kl": kl * desirable.numel(),
            "reward_chosen": (reward * desirable).sum(),
            "reward_rejected": (reward * undesirable).sum(),
            "reward_accuracy": ((reward > 0) == desirable).float().sum(),
            "logp_chosen": (policy.detach() * desirable).sum(),
            "logp_rejected": (policy.detach() * undesirable).sum(),
            "desirable": desirable.sum().float(),
        }

    def kl_estimate(self, model, batch: dict) -> torch.Tensor:
        """TRL's KL(policy || reference) estimate from the mismatched rows, averaged over ranks, clamped at 0."""
        rows = {key: batch[f"kl_{key}"] for key in ("input_ids", "attention_mask", "labels")}
        with torch.no_grad():
            policy, _ = self.policy_logps(model, rows)
            reference, _ = self.reference(model, rows)
        return reduce((policy - reference).mean(), "mean").clamp(min=0)

    def summarize(self, sums: dict[str, float], count: float) -> dict[str, float]:
        desirable = sums.get("desirable", 0.0)
        undesirable = count - desirable
        means = {
            "loss": sums["loss"] / max(count, 1),
            "kl": sums["kl"] / max(count, 1),
            "reward_chosen": sums["reward_chosen"] / max(desirable, 1),
            "reward_rejected": sums["reward_rejected"] / max(undesirable, 1),
            "reward_accuracy": sums["reward_accuracy"] / max(count, 1),
            "logp_chosen": sums["logp_chosen"] / max(desirable, 1),
            "logp_rejected": sums["logp_rejected"] / max(undesirable, 1),
        }
        means["reward_margin"] = means["reward_chosen"] - means["reward_rejected"]
        return means | {key: value / max(count, 1) for key, value in sums.items() if key not in means
                        and key != "desirable"}
