"""Preference losses on sequence log-probabilities, as TRL 1.16 defines them (its defaults too).

Per pair, with summed response log-probs pi_c, pi_r (policy) and ref_c, ref_r (reference), lengths n_c, n_r and
delta = (pi_c - ref_c) - (pi_r - ref_r):

    sigmoid  -log sigmoid(beta * delta)                                   (DPO; trl DPOTrainer._compute_loss)
    hinge    relu(1 - beta * delta)
    ipo      ((pi_c - ref_c) / n_c - (pi_r - ref_r) / n_r - 1 / (2 beta))^2   (TRL normalises by length)
    robust   (-(1 - e) log sigmoid(beta delta) + e log sigmoid(-beta delta)) / (1 - 2e),  e = label_smoothing
    simpo    -log sigmoid(beta * (pi_c / n_c - pi_r / n_r - gamma / beta))   (reference-free; trl CPOTrainer)
    orpo     -beta * log sigmoid(log odds(pi_c / n_c) - log odds(pi_r / n_r)) - pi_c / n_c
                                                                          (reference-free; trl ORPOTrainer)

with log odds(p) = p - log(1 - exp(p)). ORPO's NLL term here is the chosen response's (response-only, averaged
over its tokens, per pair); TRL's ORPOTrainer averages the NLL over the prompt and the response tokens of the
batch. Response-only is what SFT learns in ftune (the prompt is never a target), and per pair it keeps the loss
a sum over pairs that the step divides by its pairs, exact under gradient accumulation.
`pref.sft_weight` adds weight * (-pi_c / n_c) to any of them: RPO's NLL on the chosen response (TRL's
`loss_type=["sigmoid", "sft"]`, likewise per pair rather than per batch token).

Rewards (logged) are beta * (pi - ref) summed over the response, as TRL logs them; for the reference-free losses
beta * pi / n (TRL's CPO/ORPO log beta * the average log-prob they use).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ftune.config.schema import REFERENCE_FREE_LOSSES, PrefCfg


@dataclass(frozen=True)
class PairLogps:
    """Per-pair response log-probabilities (summed over the response) and response lengths, chosen and rejected."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def averages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Length-normalised log-probs (per response token)."""
        return self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1)


def pair_losses(pref: PrefCfg, policy: PairLogps, reference: PairLogps | None) -> dict[str, torch.Tensor]:
    """Per-pair `loss` (differentiable), `reward_chosen` and `reward_rejected` (detached) for `pref.loss`."""
    if pref.loss in REFERENCE_FREE_LOSSES:
        loss, chosen_reward, rejected_reward = reference_free_losses(pref, policy)
    else:
        loss, chosen_reward, rejected_reward = reference_losses(pref, policy, reference)
    if pref.sft_weight:
        loss = loss - pref.sft_weight * policy.averages()[0]
    return {"loss": loss, "reward_chosen": chosen_reward.detach(), "reward_rejected": rejected_reward.detach()}


def reference_losses(pref: PrefCfg, policy: PairLogps, reference: PairLogps):
    """sigmoid, hinge, ipo, robust: losses on the log-ratios against the reference; rewards beta * log-ratio."""
    beta, smoothing = pref.beta, pref.label_smoothing
    chosen_ratio, rejected_ratio = policy.chosen - reference.chosen, policy.rejected - reference.rejected
    delta = chosen_ratio - rejected_ratio
    if pref.loss == "sigmoid":
        loss = -F.logsigmoid(beta * delta)
    elif pref.loss == "hinge":
        loss = torch.relu(1 - beta * delta)
    elif pref.loss == "ipo":
        per_token = chosen_ratio / policy.chosen_tokens.clamp(min=1) - rejected_ratio / policy.rejected_tokens.clamp(
            min=1)
        loss = (per_token - 1 / (2 * beta)) ** 2
    elif pref.loss == "robust":
        loss = (-(1 - smoothing) * F.logsigmoid(beta * delta) + smoothing * F.logsigmoid(-beta * delta)) / (
            1 - 2 * smoothing)
    else:
        raise ValueError(f"unknown pref.loss {pref.loss!r}")
    return loss, beta * chosen_ratio, beta * rejected_ratio


def reference_free_losses(pref: PrefCfg, policy: PairLogps):
    """The reference-free simpo and orpo, on length-normalised log-probs; rewards beta * average log-prob."""
    beta = pref.beta
    chosen, rejected = policy.averages()
    if pref.loss == "simpo":
        loss = -F.logsigmoid(beta * (chosen - rejected - pref.simpo_gamma / beta))
    else:
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        loss = -beta * F.logsigmoid(log_odds) - chosen
    return loss, beta * chosen, beta * rejected


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (as TRL's ORPO computes it)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def kto_losses(pref: PrefCfg, policy: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor,
               kl: torch.Tensor) -> dict[str, torch.Tensor]:
    """TRL's KTO loss per completion, and its reward, from summed completion log-probs.

    desirable:   w_d * (1 - sigmoid(beta * (log-ratio - KL)))
    undesirable: w_u * (1 - sigmoid(beta * (KL - log-ratio)))
    with KL the batch's estimate of KL(policy || reference), detached and clamped at 0 (see KtoObjective).
    """
    beta, ratio = pref.beta, policy - reference
    loss = torch.where(desirable, pref.desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                       pref.undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    return {"loss": loss, "reward": (beta * ratio).detach()}
