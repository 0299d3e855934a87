"""`objective=grpo`: online RL on verifiable rewards, completions sampled from the policy as it trains.

Each optimizer step takes its micro-batches of prompts (`ftune.data.prompts`) and, before any gradient, turns them
into rollouts (`prepare_step`): `grpo.num_generations` completions per prompt sampled from the policy as it is
(`generation.backend`, `ftune.eval.generation.GENERATION_BACKENDS`: transformers' `generate` with a KV cache,
dropout off), each scored by the user's reward
functions (`ftune.train.rewards`, TRL's signature), and each group's rewards turned into advantages
(`grpo_losses.group_advantages`). The loss is the clipped policy gradient on the completion tokens only
(`grpo_losses.policy_loss`, TRL's definitions of `grpo.loss`), computed as a sum over the micro-batch that the loop
divides by the whole step's count: completions for `grpo`, completion tokens for `dapo` and `bnpo`, completions x
`max_completion_length` for `dr_grpo`, so 2 micro-batches x 4 prompts give the gradient of 8.

A prompt's group trains in one row (`grpo.share_prompt`, where the model passes its probe: `prompt_sharing_problem`):
the prompt once, then each completion, laid out as DPO's pairs are (`shared_prompt_rows`), or each completion in its
own row after its prompt. Either way the per-token log-probs come back as [completions, completion tokens]
(`on_completions`), the layout the loss, the saved sampling log-probs and the reference's share.

By default one optimizer step per batch of generations (TRL's `num_iterations=1`): the sampling policy is the
trained one and the importance ratio is 1 with its gradient (`old_per_token_logps=None`). With
`grpo.num_iterations` = k, k steps train on each batch, the later ones with the ratio to the log-probs saved with
the rollouts (`old_logps`); the loader repeats each step's prompts k times (`ftune.data.sampler.RepeatedSteps`) and
a checkpoint carries the rollouts, so a run resumed between two of those steps trains on the same completions.
With `grpo.beta > 0` the reference's per-token log-probs are computed with the rollouts (LoRA: the adapter off;
full fine-tuning: a frozen copy).

The reward statistics are logged with the step (`reward`, `reward_std`, `reward_<function>`, `completion_length`
and its min and max, `clipped_ratio`, `clip_ratio`, `kl`), and every `trainer.sample_every` steps the step's
prompts, completions and rewards are appended to generations.jsonl.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device

from ftune.data.collate import PairCollator, pad_multiple, shared_prompt_rows
from ftune.data.mask import IGNORE_INDEX
from ftune.data.prompts import build_prompt_loader, build_prompt_rows
from ftune.data.templates import resolve_template
from ftune.errors import DataError
from ftune.eval.generation import (
    GENERATION_BACKENDS,
    GENERATIONS_FILE,
    Sampled,
    SamplingSettings,
    padding_rows,
    stop_token_ids,
)
from ftune.model.dropout import disable_dropout, eval_mode
from ftune.model.load import load_frozen
from ftune.train.isolation import prompt_sharing_problem
from ftune.train.losses import build_sequence_logps, build_step_loss
from ftune.train.objectives.base import Objective
from ftune.train.objectives.grpo_losses import group_advantages, policy_loss
from ftune.train.objectives.preference import Reference
from ftune.train.rewards import load_reward_funcs, reward_weights, score

ROLLOUTS_FILE = "grpo_rollouts_{}.pt"
"""A checkpoint's rollouts of one process (`grpo.num_iterations` > 1), by process index."""


@dataclass
class Rollout:
    """One micro-batch's completions, what the loss needs of them, and the texts the reward functions read."""

    batch: dict
    prompts: list
    completions: list
    rewards: torch.Tensor
    per_function: torch.Tensor


class GrpoObjective(Objective):
    """`objective=grpo`: the clipped policy gradient on sampled completions, with the user's rewards."""

    count_name = "completions"
    samples_itself = True

    def __init__(self, cfg):
        super().__init__(cfg)
        grpo = cfg.grpo
        self.reward_funcs = load_reward_funcs(grpo.reward_funcs)  # a wrong spec fails here, before any model loads
        self.weights = reward_weights(grpo.reward_weights, len(self.reward_funcs))
        self.epsilon_high = grpo.epsilon if grpo.epsilon_high is None else grpo.epsilon_high
        self.frozen_copy = self.reference = self.accelerator = None
        self.shared_mask: str | None = None  # the attention a group's one row is masked for; None: a row per completion
        self.unshared_because: str | None = None  # why not (`prompt_sharing_problem`)
        self.extremes: dict[str, float] = {}
        self.last_rollouts: list[Rollout] = []

    @property
    def needs_reference_adapter(self) -> bool:
        return self.cfg.keeps_reference_model

    def build_loaders(self, tokenizer, accelerator: Accelerator) -> tuple[dict, dict]:
        cfg = self.cfg
        self.tokenizer, self.template = tokenizer, resolve_template(cfg.data.chat_template, tokenizer)
        room, iterations = cfg.grpo.max_completion_length, cfg.grpo.num_iterations
        train, train_stats = build_prompt_rows(cfg.data.path, tokenizer, self.template, cfg.data, room)
        step_batches = cfg.trainer.grad_accum * (accelerator.num_processes if accelerator is not None else 1)
        loaders = {"train": build_prompt_loader(train, cfg.trainer.micro_batch_size, shuffle=True,
                                                step_batches=step_batches, times=iterations), "eval": None}
        if not len(loaders["train"]):
            step = cfg.trainer.micro_batch_size * step_batches
            raise DataError(f"{cfg.data.path}: {len(train)} prompts, fewer than one optimizer step's {step} "
                            f"(grpo.num_iterations={iterations} leaves out an incomplete step)",
                            "lower trainer.micro_batch_size or trainer.grad_accum")
        stats = {"train": train_stats, "eval": None}
        if cfg.data.eval_path:
            held_out, stats["eval"] = build_prompt_rows(cfg.data.eval_path, tokenizer, self.template, cfg.data, room)
            loaders["eval"] = build_prompt_loader(held_out, cfg.trainer.micro_batch_size, shuffle=False)
        return loaders, stats

    def load_frozen(self) -> None:
        """Full fine-tuning with `grpo.beta > 0`: a frozen copy of the base as the reference."""
        if self.cfg.keeps_reference_model and self.cfg.method.name == "full":
            self.frozen_copy = load_frozen(self.cfg.model, "model.name_or_path")

    def attach(self, model, tokenizer) -> None:
        disable_dropout(model)  # the sampling policy is the one trained: ratio 1 at each step's start, as in TRL
        self.logps = build_sequence_logps(model, self.cfg.trainer)
        self.token_loss = build_step_loss(model, self.cfg.trainer)
        self.reference = Reference(model, self.frozen_copy, self.cfg.trainer) if self.cfg.keeps_reference_model \
            else None
        pairs = PairCollator(tokenizer.pad_token_id)  # the probe's: a group of two is a pair
        self.unshared_because = prompt_sharing_problem(self.cfg, model, self.logps, pairs)
        if self.unshared_because is None:
            self.shared_mask = self.cfg.model.attn_implementation
        grpo = self.cfg.grpo
        settings = SamplingSettings(grpo.num_generations, grpo.max_completion_length, grpo.temperature, grpo.top_p,
                                    stop_token_ids(self.template, tokenizer, model), tokenizer.pad_token_id,
                                    padding_rows(model, tokenizer))
        self.backend = GENERATION_BACKENDS[self.cfg.generation.backend](settings)

    def start(self, model, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        if self.cfg.grpo.num_iterations > 1:  # a checkpoint between two steps on one rollout must carry it
            accelerator.register_save_state_pre_hook(self.save_rollouts)
            accelerator.register_load_state_pre_hook(self.load_rollouts)

    def save_rollouts(self, _models, _weights, directory: str) -> None:
        """Write this process's last rollouts into a checkpoint (each process has its own prompts)."""
        saved = {"rollouts": [vars(rollout) for rollout in self.last_rollouts], "extremes": self.extremes}
        torch.save(saved, Path(directory) / ROLLOUTS_FILE.format(self.accelerator.process_index))

    def load_rollouts(self, _models, directory: str) -> None:
        """Read back what `save_rollouts` wrote, so a resumed run trains its next steps on the same completions."""
        path = Path(directory) / ROLLOUTS_FILE.format(self.accelerator.process_index)
        saved = torch.load(path, map_location=self.accelerator.device, weights_only=True)
        self.last_rollouts = [Rollout(**rollout) for rollout in saved["rollouts"]]
        self.extremes = saved["extremes"]

    def prepare_step(self, model, batches: list[dict], step: int) -> list[dict]:
        """Sample, score and weigh every micro-batch's completions before the step's first gradient.

        With `grpo.num_iterations` = k, only every k-th step samples (steps 1, k + 1, ...); the steps between train
        again on its rollouts, which the loader's repeated prompts (`RepeatedSteps`) stand for.
        """
        if (step - 1) % self.cfg.grpo.num_iterations:
            return [rollout.batch for rollout in self.last_rollouts]
        policy = self.accelerator.unwrap_model(model)
        rollouts = [self.rollout(policy, batch, scorer=model) for batch in batches]
        rewards = torch.cat([r.rewards for r in rollouts])
        advantages, group_std = group_advantages(rewards, self.cfg.grpo.num_generations, self.cfg.grpo.scale_rewards)
        start = 0
        for rollout in rollouts:
            n = rollout.rewards.numel()
            rollout.batch["rewards"], rollout.batch["reward_per_function"] = rollout.rewards, rollout.per_function
            rollout.batch["advantages"] = advantages[start:start + n].to(rollout.batch["input_ids"].device)
            rollout.batch["group_std"] = group_std[start // self.cfg.grpo.num_generations:
                                                   (start + n) // self.cfg.grpo.num_generations]
            start += n
        lengths = torch.cat([r.batch["completion_mask"].sum(1) for r in rollouts]).float()
        self.extremes = {"completion_length_min": lengths.min().item(), "completion_length_max": lengths.max().item()}
        self.last_rollouts = rollouts
        every = self.cfg.trainer.sample_every
        if every and any(later % every == 0 for later in range(step, step + self.cfg.grpo.num_iterations)):
            self.write_generations(step)  # once per rollout, when a step that trains on it is due
        return [r.batch for r in rollouts]

    @torch.no_grad()
    def rollout(self, policy, batch: dict, scorer=None) -> Rollout:
        """One micro-batch of prompts: completions sampled, scored, and laid out for the loss (prompt then answer).

        `scorer`: the model as the training forward calls it (wrapped, under its autocast), which computes the
        log-probs the loss needs besides the current ones; None (evaluation, which reads the rewards only) skips them.
        """
        grpo = self.cfg.grpo
        with eval_mode(policy):
            sampled = self.backend.sample(policy, batch["prompt_ids"])
        repeat = grpo.num_generations
        prompts = [prompt for prompt in batch["prompts"] for _ in range(repeat)]
        texts = self.completion_texts(sampled)
        completions = [[{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
                       for prompt, text in zip(prompts, texts, strict=True)]
        columns = {name: [value for value in values for _ in range(repeat)]
                   for name, values in batch["columns"].items()}
        ids = [row[mask.bool()].tolist() for row, mask in zip(sampled.completion_ids, sampled.completion_mask,
                                                               strict=True)]
        rewards, per_function = score(self.reward_funcs, self.weights, prompts, completions, columns, ids)
        return Rollout(self.training_batch(policy, sampled, scorer), prompts, completions, rewards, per_function)

    def completion_texts(self, sampled: Sampled) -> list[str]:
        """Each completion decoded up to its stop token, cut at the template's end of turn, as `ftune eval` reads it."""
        texts = []
        for row, mask in zip(sampled.completion_ids, sampled.completion_mask, strict=True):
            text = self.tokenizer.decode(row[mask.bool()], skip_special_tokens=True)
            texts.append(text.split(self.template.end_of_turn)[0].strip() if self.template.end_of_turn else text)
        return texts

    def training_batch(self, policy, sampled: Sampled, scorer=None) -> dict:
        """The rows the loss trains on: each group in one row (`group_rows`) or each completion in its own.

        `loss_mask` [completions, completion tokens] marks the tokens the loss learns (the completion up to its stop
        token; none of a cut one under `grpo.mask_truncated_completions`). With a `scorer`, the batch also carries
        the reference's log-probs (`grpo.beta` > 0) and, when the rollout trains more than one step
        (`grpo.num_iterations` > 1), the sampling policy's (`old_logps`, TRL's `old_per_token_logps`), both laid
        out as `on_completions` lays out the policy's.
        """
        grpo = self.cfg.grpo
        keep = sampled.completion_mask
        if grpo.mask_truncated_completions:
            keep = keep * (~sampled.truncated).unsqueeze(1)
        rows = self.group_rows(sampled, keep) if self.shared_mask is not None else completion_rows(sampled, keep)
        batch = {**rows, "loss_mask": keep, "completion_mask": sampled.completion_mask, "truncated": sampled.truncated}
        if self.reference is not None and scorer is not None:
            batch["ref_logps"] = on_completions(batch, self.reference.per_token(policy, batch))
        if grpo.num_iterations > 1 and scorer is not None:
            batch["old_logps"] = on_completions(batch, self.logps.per_token(scorer, batch))
        return batch

    def group_rows(self, sampled: Sampled, keep: torch.Tensor) -> dict:
        """One row per prompt (`shared_prompt_rows`): its tokens once, then each completion's kept tokens.

        The prompt's positions count from its first token, as `generate` counted them, and each completion's from
        the prompt's end, so every token's log-prob is the one it was sampled with. Completion i of the rollout is
        sequence i (`logp_slot`); one with nothing kept takes no place in its row.
        """
        size = self.cfg.grpo.num_generations
        prompts = [row[mask.bool()].tolist() for row, mask in zip(sampled.prompt_ids[::size],
                                                                   sampled.prompt_mask[::size], strict=True)]
        kept = [row[:length].tolist() for row, length in zip(sampled.completion_ids, keep.sum(1).tolist(),
                                                             strict=True)]
        groups = [range(start, start + size) for start in range(0, len(kept), size)]
        rows = shared_prompt_rows(prompts, [[kept[i] for i in group] for group in groups], [list(g) for g in groups],
                                  self.tokenizer.pad_token_id, pad_multiple(self.cfg.data.pad_to_multiple_of),
                                  self.shared_mask)
        return send_to_device(rows, sampled.completion_ids.device)

    def count(self, batch: dict) -> torch.Tensor:
        """What the step divides the summed loss by (see the module docstring).

        Counted on the completions, not the rows: a row holds a whole group when the prompt is shared.
        """
        kept = batch["loss_mask"]
        completions = torch.tensor(kept.size(0), device=kept.device)
        if self.cfg.grpo.loss == "grpo":
            return completions
        if self.cfg.grpo.loss == "dr_grpo":
            return completions * self.cfg.grpo.max_completion_length
        return kept.sum()  # the learned completion tokens

    def loss(self, model, batch: dict) -> dict[str, torch.Tensor]:
        grpo = self.cfg.grpo
        parts = policy_loss(on_completions(batch, self.logps.per_token(model, batch)), batch.get("old_logps"),
                            batch.get("ref_logps"), batch["advantages"], batch["loss_mask"],
                            loss_type=grpo.loss, epsilon_low=grpo.epsilon, epsilon_high=self.epsilon_high,
                            beta=grpo.beta, max_completion_length=grpo.max_completion_length)
        return {"loss": parts["loss"], **self.logged_sums(batch, parts)}

    def logged_sums(self, batch: dict, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sums over this micro-batch's completions and tokens that `summarize` turns into the step's means."""
        device = parts["loss"].device
        rollout_sums = {"completions": parts["completions"], "completion_tokens": parts["tokens"],
                        "completion_length": batch["completion_mask"].sum().float(),
                        "clipped": batch["truncated"].sum().float(), "groups": torch.tensor(
                            float(batch["group_std"].numel()), device=device),
                        "reward_std": batch["group_std"].sum().to(device)}
        return rollout_sums | {key: parts[key] for key in ("clip_region", "kl") if key in parts} | \
            self.reward_sums(batch, device)

    def reward_sums(self, batch: dict, device) -> dict[str, torch.Tensor]:
        """The micro-batch's summed rewards, weighted and per function (None rewards left out of the sums)."""
        sums = {"reward": torch.nansum(batch["rewards"])}
        for index, func in enumerate(self.reward_funcs):
            sums[f"reward_{func.name}"] = torch.nansum(batch["reward_per_function"][:, index])
        return {key: value.to(device) for key, value in sums.items()}

    def summarize(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """The step's means: the loss over its count, rewards and lengths over completions, ratios over tokens."""
        completions, tokens = max(sums["completions"], 1), max(sums["completion_tokens"], 1)
        metrics = {"loss": sums["loss"] / max(count, 1)}
        metrics |= {key: sums[key] / completions for key in sums if key.startswith("reward") and key != "reward_std"}
        metrics |= {"reward_std": sums["reward_std"] / max(sums["groups"], 1),
                    "completion_length": sums["completion_length"] / completions,
                    "clipped_ratio": sums["clipped"] / completions, "clip_ratio": sums["clip_region"] / tokens}
        if "kl" in sums:
            metrics["kl"] = sums["kl"] / tokens
        return metrics | self.extremes

    def evaluate(self, model, loader, max_batches: int) -> dict[str, float]:
        """Held-out prompts: the mean reward (weighted and per function) of completions sampled as in training."""
        policy = self.accelerator.unwrap_model(model)
        totals, count = None, 0
        for index, batch in enumerate(loader):
            if index == max_batches:
                break
            rollout = self.rollout(policy, batch)
            sums = torch.cat([torch.nansum(rollout.rewards).view(1), torch.nansum(rollout.per_function, dim=0)])
            totals = sums if totals is None else totals + sums
            count += rollout.rewards.numel()
        totals = self.accelerator.reduce(totals.to(self.accelerator.device), "sum").tolist()
        count = self.accelerator.reduce(torch.tensor(count, device=self.accelerator.device), "sum").item()
        names = ["eval_reward", *(f"eval_reward_{func.name}" for func in self.reward_funcs)]
        return {name: total / max(count, 1) for name, total in zip(names, totals, strict=True)}

    def write_generations(self, step: int) -> None:
        """Append the step's prompts, completions and rewards to generations.jsonl (main process only)."""
        if not self.accelerator.is_main_process:
            return
        path = Path(self.cfg.output_dir) / GENERATIONS_FILE
        with path.open("a", encoding="utf-8") as handle:  # an append-only log, like metrics.jsonl
            for rollout in self.last_rollouts:
                for index, (prompt, completion) in enumerate(zip(rollout.prompts, rollout.completions, strict=True)):
                    rewards = {func.name: rollout.per_function[index, k].item()
                               for k, func in enumerate(self.reward_funcs)}
                    handle.write(json.dumps({"step": step, "prompt": prompt, "completion": completion,
                                             "reward": rollout.rewards[index].item(), "rewards": rewards}) + "\n")

    def describe(self) -> dict[str, str]:
        grpo = self.cfg.grpo
        reference = self.reference.describe() if self.reference is not None else "none (grpo.beta=0)"
        funcs = ", ".join(f"{func.name} ({func.source})" for func in self.reward_funcs)
        return super().describe() | {
            "loss": f"{grpo.loss} (epsilon {grpo.epsilon}/{self.epsilon_high}, beta {grpo.beta})",
            "rewards": funcs, "generations": f"{grpo.num_generations} per prompt, up to {grpo.max_completion_length} "
                                             f"tokens, temperature {grpo.temperature}, top_p {grpo.top_p}, "
                                             f"{grpo.num_iterations} step(s) on each",
            "reference": reference,
            "prompt": "once per group (one row: the prompt, then each completion)" if self.shared_mask is not None
            else f"repeated for each completion ({self.unshared_because})"}


def completion_rows(sampled: Sampled, keep: torch.Tensor) -> dict:
    """Each completion in its own row after its left-padded prompt, its kept tokens labelled.

    `generate` counts a left-padded prompt's positions from its first token; the training forward passes the same
    `position_ids`, so each token's log-prob is the one it was sampled with.
    """
    input_ids = torch.cat([sampled.prompt_ids, sampled.completion_ids], dim=1)
    attention = torch.cat([sampled.prompt_mask, sampled.completion_mask], dim=1)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, sampled.prompt_ids.size(1):] = torch.where(keep.bool(), sampled.completion_ids, IGNORE_INDEX)
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    return {"input_ids": input_ids, "attention_mask": attention, "position_ids": positions, "labels": labels,
            "num_tokens": attention.sum()}


def on_completions(batch: dict, logps: torch.Tensor) -> torch.Tensor:
    """`SequenceLogps.per_token` of either layout as [completions, completion tokens], 0 on tokens not learned.

    A row per completion gives [rows, length - 1], whose last columns predict the completion's tokens; a group's
    row lists its learned tokens, each with its completion (`logp_slot`) and place in it (`logp_offset`).
    """
    kept = batch["loss_mask"]
    if "logp_offset" in batch:
        return logps.new_zeros(kept.shape).index_put((batch["logp_slot"], batch["logp_offset"]), logps)
    return logps[:, -kept.size(1):]
