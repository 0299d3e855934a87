"""GRPO's advantages and clipped policy loss, as TRL 1.16 defines them, returned as sums for exact accumulation.

Advantages (trl/trainer/grpo_trainer.py `_generate_and_score_completions`, lines 2761-2810, the default
`multi_objective_aggregation="sum_then_normalize"`), for the rewards r of a group of G completions of one prompt:

    group   A = (r - mean_group(r)) / (std_group(r) + 1e-4)
    batch   A = (r - mean_group(r)) / (std_batch(r) + 1e-4)        (PPO Lite; the centre is still the group's)
    none    A =  r - mean_group(r)                                  (Dr. GRPO)

std is Bessel-corrected (unbiased) and ignores NaN (`trl.trainer.utils.nanstd`); a reward that is NaN (every
reward function returned None for that completion) is left out of its group's mean and std and gets advantage 0.

Per completion token t, with the importance ratio rho = exp(logp - logp_old) and the reference's log-prob ref:

    loss_t = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * (exp(ref - logp) - (ref - logp) - 1)

(lines 3083-3120 and 3149-3150: the clipped objective, and TRL's k3 estimate of KL(policy || reference), added
only when beta > 0). Then, with m the completion mask, L_i = sum_t m_t loss_t and n_i = sum_t m_t for completion i
of the B in a batch, the loss types reduce (lines 3153-3173):

    grpo      mean_i (L_i / max(n_i, 1))              each completion's token mean, then the mean over completions
    bnpo      sum_i L_i / sum_i n_i                   TRL: the tokens of the micro-batch on this rank
    dr_grpo   sum_i L_i / (B * max_completion_length)
    dapo      sum_i L_i / sum_i n_i                   TRL: the tokens of the whole accumulated batch on every rank

`policy_loss` returns the numerator summed over the micro-batch and the count it is a mean over, and the loop
divides the step's summed numerators by the step's summed counts (every micro-batch, every rank). What that gives,
against TRL, under gradient accumulation (TRL splits a step into equal micro-batches, divides grpo, bnpo and
dr_grpo by the accumulation steps itself, line 285 `loss_is_scaled_for_ga = True`, and DDP averages ranks):

- grpo: TRL's mean of per-micro-batch means of B completions each is the mean over the step's completions;
  ftune's (sum of token means) / (completions) is the same number. A completion masked out entirely
  (`mask_truncated_completions`) adds 0 and still counts, in both.
- dr_grpo: likewise exact in both: (step's token sum) / (step's completions * max_completion_length).
- dapo: TRL divides every micro-batch by `num_items_in_batch` (the completion tokens of the generation batch on all
  ranks), rescaled by accumulation steps / steps_per_generation (TRL issue #5619, fixed by PR #6024). With the
  default steps_per_generation = gradient_accumulation_steps that is the step's own token count, exact; when one
  generation batch spans several optimizer steps it is their average token count, not each step's. ftune always
  divides by the step's own token count.
- bnpo: TRL divides by each micro-batch's (and each rank's) own token count and then averages the micro-batches,
  so a step of micro-batches with different token counts is not the token mean of the step, and the same data gives
  a different gradient at another micro-batch size (TRL's docs say so). ftune divides by the step's tokens, so in
  ftune bnpo is the token mean of the step at any accumulation: the same loss as dapo (as TRL's bnpo is with one
  micro-batch on one rank), kept as a name so TRL recipes map one to one.

Logged sums (detached), token means once divided by the step's completion tokens, as TRL's `global_masked_mean`
(lines 3254-3283) computes them per micro-batch before its logger averages the micro-batches: `clip_low`
(rho < 1 - eps_low where A < 0), `clip_high` (rho > 1 + eps_high where A > 0), `clip_region` (either), and `kl`
when beta > 0. TRL's `clip_ratio/low_min` and `high_max` (extremes of per-completion means) are not sums and are
not returned.
"""

import torch

SCALE_REWARDS = ("group", "batch", "none")
LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
STD_EPSILON = 1e-4  # TRL's `std_rewards + 1e-4`


def nanstd(values: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected standard deviation ignoring NaN, NaN where fewer than two values (`trl.trainer.utils.nanstd`).

    Unbiased because TRL's is: the advantages must equal TRL's, and with groups of 4 to 16 the two differ by 3-15%.
    """
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    variance = torch.nanmean((values - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    variance = torch.where(count > 1, variance * count / (count - 1).clamp(min=1), torch.nan)
    std = variance.sqrt()
    return std.reshape(()) if dim is None else std.squeeze(dim)


def group_advantages(rewards: torch.Tensor, group_size: int,
                     scale_rewards: str | bool = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """Each completion's advantage and each group's reward std, from rewards in prompt-major order.

    `rewards` is [n_prompts * group_size], the G completions of a prompt next to each other, and must hold every
    completion of the step (gathered from all ranks, as TRL gathers before it normalises): a group's mean and the
    batch std are over all of them. `scale_rewards` is TRL's: "group", "batch" or "none" (True and False are TRL's
    spellings of "group" and "none"). The std returned is per group ([n_prompts], 0 for groups of one) whatever the
    scaling: a group whose std is 0 teaches nothing (its advantages are 0), which is what a run logs. TRL logs
    `frac_reward_zero_std` from the std it scaled by, the batch's under "batch".
    """
    scale = {True: "group", False: "none"}.get(scale_rewards, scale_rewards)
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, not {scale_rewards!r}")
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    group_std = nanstd(grouped, dim=1) if group_size > 1 else grouped.new_zeros(grouped.size(0))
    advantages = rewards - mean
    if scale == "group":
        advantages = advantages / (group_std.repeat_interleave(group_size) + STD_EPSILON)
    elif scale == "batch":
        batch_std = nanstd(rewards) if rewards.numel() > 1 else rewards.new_zeros(())
        advantages = advantages / (batch_std + STD_EPSILON)
    return torch.nan_to_num(advantages, nan=0.0), group_std


def policy_loss(per_token_logps: torch.Tensor, old_per_token_logps: torch.Tensor | None,
                ref_per_token_logps: torch.Tensor | None, advantages: torch.Tensor, completion_mask: torch.Tensor, *,
                loss_type: str, epsilon_low: float, epsilon_high: float, beta: float,
                max_completion_length: int) -> dict[str, torch.Tensor]:
    """The micro-batch's GRPO loss as a sum and what the step divides it by, and the logged sums.

    Tensors are [B, T] over the completion tokens (`advantages` [B] or [B, 1]); `old_per_token_logps` None means
    the policy that sampled is the one being trained (one iteration per generation batch: the ratio is 1 and only
    its gradient acts, as TRL does when it skips computing them). Returns:

    - `loss`: the numerator (differentiable), summed over this micro-batch;
    - `count`: what the step divides the summed `loss` by (completions for grpo, completion tokens for bnpo and
      dapo, completions * max_completion_length for dr_grpo), so that accumulation is exact;
    - `tokens` and `completions`: this micro-batch's completion tokens and completions, the counts of the logged sums;
    - `clip_low`, `clip_high`, `clip_region` and, when beta > 0, `kl`: detached sums over completion tokens.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    if beta and ref_per_token_logps is None:
        raise ValueError("beta > 0 needs the reference's per-token log-probs")
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(per_token_logps - old)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    mask = completion_mask.to(per_token.dtype)
    sums = {}
    if beta:
        log_ratio_ref = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1
        per_token = per_token + beta * per_token_kl
        sums["kl"] = (per_token_kl.detach() * mask).sum()
    token_sums = (per_token * mask).sum(-1)
    tokens, completions = mask.sum(), torch.tensor(float(mask.size(0)), dtype=mask.dtype, device=mask.device)
    if loss_type == "grpo":
        loss, count = (token_sums / mask.sum(-1).clamp(min=1.0)).sum(), completions
    elif loss_type == "dr_grpo":
        loss, count = token_sums.sum(), completions * max_completion_length
    else:  # bnpo, dapo: the token mean of the step
        loss, count = token_sums.sum(), tokens
    with torch.no_grad():
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        sums.update(clip_low=(low * mask).sum(), clip_high=(high * mask).sum(), clip_region=((low | high) * mask).sum())
    return {"loss": loss, "count": count, "tokens": tokens, "completions": completions, **sums}
