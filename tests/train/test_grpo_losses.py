"""GRPO's advantages and loss against TRL 1.16: its formulas transcribed, then its own `_compute_loss` called.

The transcriptions run everywhere; where TRL is installed (the bench extra, which CI installs) its own code is
called on a stand-in trainer, so a transcription that drifted from TRL would fail too. Accumulation is checked on
values and gradients: ftune's sums divided by the step's count are the one-batch result for every loss type.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from ftune.train.objectives.grpo_losses import LOSS_TYPES, group_advantages, nanstd, policy_loss

EPS_LOW, EPS_HIGH, MAX_LEN = 0.2, 0.28, 9


def trl_nanstd(tensor: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """trl/trainer/utils.py (TRL 1.16) `nanstd`, lines 1037-1050, literally (keepdim=False)."""
    mean = torch.nanmean(tensor, dim=dim, keepdim=True)
    variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    variance *= correction
    std = torch.sqrt(variance)
    return std.squeeze() if dim is None else std.squeeze(dim)


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """trl/trainer/grpo_trainer.py (TRL 1.16) lines 2765-2787 and 2810 (sum_then_normalize), literally."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        if num_generations > 1:
            std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = torch.zeros_like(rewards)
    else:
        std_rewards = trl_nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def random_rewards(seed: int, prompts: int = 5, group: int = 4) -> torch.Tensor:
    """Rewards on a few levels (so groups tie), one unscorable completion (NaN) and one all-NaN group."""
    gen = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 4, (prompts * group,), generator=gen).float() / 2 + torch.rand(prompts * group,
                                                                                            generator=gen)
    rewards[1] = torch.nan
    rewards[-group:] = torch.nan
    return rewards


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_a_group_of_equal_rewards_has_zero_advantages_and_zero_std(scale):
    rewards = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.0, 1.0, 1.0, 0.0])
    advantages, std = group_advantages(rewards, 4, scale)
    assert advantages[:4].tolist() == [0.0] * 4
    assert std[0].item() == 0.0 and std[1].item() > 0
    assert advantages[4:].abs().min() > 0.4  # the other group does learn


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("seed", [0, 1])
def test_advantages_match_trl(scale, seed):
    rewards = random_rewards(seed)
    advantages, std = group_advantages(rewards, 4, scale)
    torch.testing.assert_close(advantages, trl_advantages(rewards, 4, scale), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(std, trl_nanstd(rewards.view(-1, 4), dim=1), equal_nan=True)
    assert advantages[1] == 0 and advantages[-4:].eq(0).all()  # unscorable: advantage 0, as TRL


def test_advantages_of_groups_of_one_are_zero_and_bools_are_trls_spellings():
    rewards = torch.tensor([0.0, 1.0, 3.0])
    for scale in ("group", "none", True, False):
        advantages, std = group_advantages(rewards, 1, scale)
        assert advantages.tolist() == [0.0] * 3 and std.tolist() == [0.0] * 3
    rewards = random_rewards(3)
    torch.testing.assert_close(group_advantages(rewards, 4, True)[0], group_advantages(rewards, 4, "group")[0])
    torch.testing.assert_close(group_advantages(rewards, 4, False)[0], group_advantages(rewards, 4, "none")[0])
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 4, "prompt")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_nanstd_is_trls():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    values = random_rewards(4).view(-1, 4)
    values[2, 1:] = torch.nan  # a group with a single value: NaN, as TRL
    torch.testing.assert_close(nanstd(values, dim=1), trl_utils.nanstd(values, dim=1), equal_nan=True)
    torch.testing.assert_close(nanstd(values), trl_utils.nanstd(values))
    torch.testing.assert_close(trl_nanstd(values, dim=1), trl_utils.nanstd(values, dim=1), equal_nan=True)


def batch(seed: int, rows: int = 6, length: int = 7, lengths: list[int] | None = None) -> dict:
    """Random log-probs, old log-probs off enough for both clips, a reference, advantages and a ragged mask.

    Unless `lengths` says otherwise, the last completion is masked out entirely (a truncated completion).
    """
    gen = torch.Generator().manual_seed(seed)
    lengths = lengths or [*torch.randint(1, length + 1, (rows - 1,), generator=gen).tolist(), 0]
    mask = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    logps = (-3 * torch.rand(rows, length, generator=gen, dtype=torch.float64)).requires_grad_()
    old = logps.detach() + 0.4 * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    ref = logps.detach() + 0.5 * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    advantages = torch.randn(rows, generator=gen, dtype=torch.float64)
    return {"logps": logps, "old": old, "ref": ref, "advantages": advantages, "mask": mask.long()}


def ours(data: dict, loss_type: str, beta: float, rows: slice = slice(None)) -> dict:
    return policy_loss(data["logps"][rows], data["old"][rows], data["ref"][rows], data["advantages"][rows],
                       data["mask"][rows], loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH,
                       beta=beta, max_completion_length=MAX_LEN)


def trl_formula(data: dict, loss_type: str, beta: float) -> torch.Tensor:
    """TRL 1.16's loss, transcribed from trl/trainer/grpo_trainer.py `_compute_loss` (one process, no accumulation).

    Lines 3083-3102 (ratio, k3 KL), 3112-3120 (clipped objective), 3149-3173 (the reductions).
    """
    per_token_logps, mask, advantages = data["logps"], data["mask"], data["advantages"].unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - data["old"])
    ref_per_token_logps = data["ref"]
    per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - EPS_LOW, 1 + EPS_HIGH)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        return ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (per_token_loss * mask).sum() / (per_token_loss.size(0) * MAX_LEN)
    num_items_in_batch = mask.sum()  # dapo: the accumulated batch's tokens on every rank; here the batch
    return (per_token_loss * mask).sum() / num_items_in_batch.clamp(min=1.0)


def value_and_grad(data: dict, compute) -> tuple[torch.Tensor, torch.Tensor]:
    data["logps"].grad = None
    loss = compute()
    loss.backward()
    return loss.detach(), data["logps"].grad.clone()


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_is_trls_formula_values_and_gradients(loss_type, beta):
    data = batch(seed=10)
    sums = ours(data, loss_type, beta)
    assert sums["clip_low"] > 0 and sums["clip_high"] > 0  # the data exercises both clips
    assert ("kl" in sums) == bool(beta)
    value, grad = value_and_grad(data, lambda: ours(data, loss_type, beta)["loss"] / sums["count"])
    trl_value, trl_grad = value_and_grad(data, lambda: trl_formula(data, loss_type, beta))
    torch.testing.assert_close(value, trl_value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-6)


def trl_compute_loss(data: dict, loss_type: str, beta: float, accumulation: int = 1,
                     num_items_in_batch: int | None = None, rows: slice = slice(None)):
    """TRL 1.16's own `GRPOTrainer._compute_loss`: the loss it backpropagates and the metrics it logged.

    Called unbound on a stand-in trainer whose model returns `data`'s log-probs: one process, token-level ratios,
    no entropy bonus, no vLLM correction, no masks of its own.
    """
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    logps, mask = data["logps"][rows], data["mask"][rows]
    metrics = defaultdict(lambda: defaultdict(list))
    trainer = SimpleNamespace(
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        loss_type=loss_type, epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, max_completion_length=MAX_LEN,
        use_vllm=False, vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, current_gradient_accumulation_steps=accumulation, model=SimpleNamespace(training=True),
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=accumulation),
        accelerator=SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t),
        _metrics=metrics, _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None))
    rows_, length = logps.shape
    inputs = {
        "prompt_ids": torch.zeros(rows_, 1, dtype=torch.long), "prompt_mask": torch.ones(rows_, 1, dtype=torch.long),
        "completion_ids": torch.zeros(rows_, length, dtype=torch.long), "completion_mask": mask,
        "advantages": data["advantages"][rows], "old_per_token_logps": data["old"][rows],
        "ref_per_token_logps": data["ref"][rows],
        "num_items_in_batch": mask.sum() if num_items_in_batch is None else torch.tensor(num_items_in_batch),
    }
    return grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs), metrics["train"]


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_is_trls_own_compute_loss_with_its_logged_clip_ratios_and_kl(loss_type, beta):
    data = batch(seed=11)
    sums = ours(data, loss_type, beta)
    value, grad = value_and_grad(data, lambda: ours(data, loss_type, beta)["loss"] / sums["count"])
    logged = {}

    def trl():
        loss, metrics = trl_compute_loss(data, loss_type, beta)
        logged.update(metrics)
        return loss

    trl_value, trl_grad = value_and_grad(data, trl)
    torch.testing.assert_close(value, trl_value, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, trl_grad, rtol=1e-6, atol=1e-6)
    for ours_name, trl_name in [("clip_low", "clip_ratio/low_mean"), ("clip_high", "clip_ratio/high_mean"),
                                ("clip_region", "clip_ratio/region_mean")] + [("kl", "kl")] * bool(beta):
        # TRL divides by mask.sum().float(): its logged means are float32
        assert (sums[ours_name] / sums["tokens"]).item() == pytest.approx(logged[trl_name][0], rel=1e-6), ours_name


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_without_old_logps_the_ratio_is_one_and_only_its_gradient_acts(loss_type):
    data = batch(seed=12)
    same = dict(data, old=data["logps"].detach())
    new = policy_loss(data["logps"], None, None, data["advantages"], data["mask"], loss_type=loss_type,
                      epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, beta=0.0, max_completion_length=MAX_LEN)
    expected, expected_grad = value_and_grad(same, lambda: ours(same, loss_type, 0.0)["loss"])
    value, grad = value_and_grad(data, lambda: new["loss"])
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)
    assert new["clip_region"] == 0


def test_refusals_of_a_bad_loss_type_and_of_beta_without_a_reference():
    data = batch(seed=13)
    common = {"epsilon_low": EPS_LOW, "epsilon_high": EPS_HIGH, "max_completion_length": MAX_LEN}
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(data["logps"], None, None, data["advantages"], data["mask"], loss_type="sapo", beta=0.0, **common)
    with pytest.raises(ValueError, match="reference"):
        policy_loss(data["logps"], None, None, data["advantages"], data["mask"], loss_type="dapo", beta=0.1, **common)


LONG_THEN_SHORT = [7, 6, 7, 5, 1, 2, 0, 1]  # the two micro-batches of 4 hold 25 and 4 completion tokens


@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_accumulation_two_by_four_is_one_batch_of_eight_values_and_gradients(loss_type, beta):
    """Each micro-batch's sum divided by the step's count (known before the backwards, as the loop does)."""
    data = batch(seed=14, rows=8, lengths=LONG_THEN_SHORT)
    one, one_grad = value_and_grad(data, lambda: (lambda s: s["loss"] / s["count"])(ours(data, loss_type, beta)))
    data["logps"].grad = None
    halves = [ours(data, loss_type, beta, slice(0, 4)), ours(data, loss_type, beta, slice(4, 8))]
    assert halves[0]["tokens"] != halves[1]["tokens"]
    step_count = sum(half["count"] for half in halves)
    value = 0.0
    for half in halves:
        (half["loss"] / step_count).backward()
        value += (half["loss"] / step_count).detach()
    torch.testing.assert_close(value, one, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(data["logps"].grad, one_grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_trls_own_accumulation_is_exact_except_bnpo(loss_type):
    """What TRL does (not ftune) with 2 micro-batches of 4: exact for grpo, dr_grpo and dapo, not for bnpo.

    grpo and dr_grpo divide each of the equal micro-batches by the accumulation steps, dapo by the accumulated
    batch's tokens: all three give the one-batch result. bnpo averages per-micro-batch token means, which is not the
    step's token mean when the micro-batches hold different numbers of tokens (TRL's docs say so). If TRL makes bnpo
    exact, this test fails, and grpo_losses' docstring changes.
    """
    data = batch(seed=15, rows=8, lengths=LONG_THEN_SHORT)
    one, _ = trl_compute_loss(data, loss_type, 0.04)
    tokens = int(data["mask"].sum())
    accumulated = sum(trl_compute_loss(data, loss_type, 0.04, accumulation=2, num_items_in_batch=tokens, rows=rows)[0]
                      for rows in (slice(0, 4), slice(4, 8)))
    ftune = (lambda s: s["loss"] / s["count"])(ours(data, loss_type, 0.04))
    torch.testing.assert_close(ftune, one, rtol=1e-9, atol=1e-12)
    if loss_type == "bnpo":
        assert abs(accumulated.item() - one.item()) > 1e-3
    else:
        torch.testing.assert_close(accumulated, one, rtol=1e-9, atol=1e-12)
