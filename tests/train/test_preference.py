"""Preference objectives: TRL's losses, chunked log-probs, accumulation over pairs, step 0, the reference.

The losses are checked on the same log-probs as TRL's; the chunked log-probs against the full logits (values and
gradients); the reference is the policy with its adapter disabled, or the start adapter kept frozen.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model

from ftune.config.schema import PrefCfg, RunCfg, TrainerCfg
from ftune.data.collate import PairCollator
from ftune.eval.loss import unfused_sequence_logps
from ftune.train.loop import forward_backward
from ftune.train.losses import SequenceLogps, build_sequence_logps
from ftune.train.objectives import build_objective
from ftune.train.objectives.pair_losses import PairLogps, kto_losses, pair_losses
from ftune.train.state import TrainState


def logps(seed: int, n: int = 6) -> PairLogps:
    """Random per-pair log-probs (negative sums) and response lengths of different sizes."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, 12, (2, n), generator=gen)
    sums = -torch.rand(2, n, generator=gen, dtype=torch.float64) * tokens * 2
    return PairLogps(sums[0], sums[1], tokens[0], tokens[1])


def trl_dpo(loss_type: str, beta: float, smoothing: float, policy: PairLogps, ref: PairLogps) -> torch.Tensor:
    """TRL 1.16's DPO losses: trl/trainer/dpo_trainer.py `_compute_loss`, lines 1372-1432, copied literally.

    `_compute_loss` needs a model and a batch, so its per-sequence formulas are applied here to the same log-probs.
    """
    chosen_logratios = policy.chosen - ref.chosen
    rejected_logratios = policy.rejected - ref.rejected
    delta_score = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta_score)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta_score)
    if loss_type == "ipo":
        chosen_avg_score = chosen_logratios / policy.chosen_tokens.clamp(min=1.0)
        rejected_avg_score = rejected_logratios / policy.rejected_tokens.clamp(min=1.0)
        return (chosen_avg_score - rejected_avg_score - 1 / (2 * beta)) ** 2
    clean_loss_term = -(1 - smoothing) * F.logsigmoid(beta * delta_score)
    flipped_loss_term = -smoothing * F.logsigmoid(-beta * delta_score)
    return (clean_loss_term - flipped_loss_term) / (1 - 2 * smoothing)


@pytest.mark.parametrize(("loss", "beta", "smoothing"), [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.0), ("hinge", 0.1, 0.0), ("ipo", 0.1, 0.0), ("ipo", 0.3, 0.0),
    ("robust", 0.1, 0.1), ("robust", 0.2, 0.3),
])
def test_reference_losses_match_trl(loss, beta, smoothing):
    policy, ref = logps(1), logps(2)
    ours = pair_losses(PrefCfg(beta=beta, loss=loss, label_smoothing=smoothing), policy, ref)
    torch.testing.assert_close(ours["loss"], trl_dpo(loss, beta, smoothing, policy, ref), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours["reward_chosen"], beta * (policy.chosen - ref.chosen))  # TRL's rewards/chosen


def test_simpo_matches_trl_cpo_loss():
    """TRL's CPOTrainer.cpo_loss (trl/experimental/cpo/cpo_trainer.py), called unbound on averaged log-probs."""
    cpo_trainer = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    policy, pref = logps(3), PrefCfg(beta=2.0, loss="simpo", simpo_gamma=0.5)
    trainer = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=0.5, beta=2.0, label_smoothing=0.0,
                              accelerator=SimpleNamespace(device="cpu"))
    losses, chosen_rewards, _ = cpo_trainer.CPOTrainer.cpo_loss(trainer, *policy.averages())
    ours = pair_losses(pref, policy, None)
    torch.testing.assert_close(ours["loss"], losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours["reward_chosen"], chosen_rewards)


def test_orpo_matches_trl_odds_ratio_loss_plus_the_chosen_nll():
    """TRL's ORPOTrainer.odds_ratio_loss, called unbound; ORPO's loss is NLL - that term (TRL subtracts its mean)."""
    orpo_trainer = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    policy = logps(4)
    trainer = SimpleNamespace(beta=0.1, accelerator=SimpleNamespace(device="cpu"))
    chosen, rejected = policy.averages()
    losses, *_ = orpo_trainer.ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    ours = pair_losses(PrefCfg(loss="orpo"), policy, None)["loss"]
    torch.testing.assert_close(ours.float(), -chosen.float() - losses, rtol=1e-6, atol=1e-6)  # TRL computes in fp32


def test_sft_weight_adds_the_chosen_nll_per_token():
    policy, ref = logps(5), logps(6)
    plain = pair_losses(PrefCfg(), policy, ref)["loss"]
    rpo = pair_losses(PrefCfg(sft_weight=0.5), policy, ref)["loss"]
    torch.testing.assert_close(rpo - plain, -0.5 * policy.chosen / policy.chosen_tokens)


def test_kto_matches_trl():
    """trl/trainer/kto_trainer.py (TRL 1.16) `_compute_loss`, the `loss_type == "kto"` branches, literally."""
    gen = torch.Generator().manual_seed(7)
    policy, reference = -torch.rand(8, generator=gen, dtype=torch.float64) * 9, -torch.rand(8, generator=gen) * 9
    labels = torch.tensor([True, False, True, True, False, False, True, False])
    kl, beta = torch.tensor(0.3, dtype=torch.float64), 0.1
    chosen_logratios = policy[labels] - reference[labels]
    rejected_logratios = policy[~labels] - reference[~labels]
    chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
    rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
    trl_loss = torch.cat((1.0 * chosen_losses, 1.0 * rejected_losses), 0).nanmean()
    ours = kto_losses(PrefCfg(), policy, reference.double(), labels, kl)
    torch.testing.assert_close(ours["loss"].mean(), trl_loss, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("loss", "smoothing", "expected"), [
    ("sigmoid", 0.0, math.log(2)), ("hinge", 0.0, 1.0), ("ipo", 0.0, 25.0), ("robust", 0.1, math.log(2)),
])
def test_step_zero_values_when_the_policy_is_the_reference(loss, smoothing, expected):
    same = logps(8)
    values = pair_losses(PrefCfg(loss=loss, label_smoothing=smoothing), same, same)["loss"]
    torch.testing.assert_close(values, torch.full_like(values, expected))


def pair_rows(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Pairs of different prompt and response lengths (so padding and chunks split them unevenly)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(length: int) -> list[int]:
        return torch.randint(1, vocab, (length,), generator=gen).tolist()

    return [{"prompt_ids": ids(2 + i % 3), "chosen_ids": ids(1 + i % 4), "rejected_ids": ids(3 + i % 2)}
            for i in range(n)]


@pytest.mark.parametrize("head_trains", [True, False])
def test_chunked_sequence_logps_equal_full_logits_with_gradients(random_llama, head_trains):
    """Per-row log-prob sums through the chunked head equal the full logits' (and so do their gradients)."""
    model = random_llama()
    model.lm_head.weight.requires_grad_(head_trains)  # frozen: the stored per-row gradients; trained: recompute
    batch = PairCollator(pad_token_id=0)(pair_rows(5, vocab=64))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    weights = torch.linspace(-1.0, 2.0, batch["input_ids"].size(0))

    def sums_and_grads(compute):
        model.zero_grad(set_to_none=True)
        sums = compute()
        (sums * weights).sum().backward()
        return sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    chunked = SequenceLogps(model.lm_head, build_sequence_logps(model, TrainerCfg(loss_chunk_size=5)).spec)
    ours, our_grads = sums_and_grads(lambda: chunked(model, batch)[0])
    full, full_grads = sums_and_grads(lambda: unfused_sequence_logps(model(**inputs).logits, batch["labels"]))
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    assert our_grads.keys() == full_grads.keys() and ("lm_head.weight" in our_grads) == head_trains
    for name, grad in full_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def sliding_mistral(attn: str):
    """A tiny random Mistral whose window (3) is shorter than the probe rows, with ftune's window hook."""
    from transformers import MistralConfig, MistralForCausalLM

    from ftune.model.instrument import instrument

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=3, pad_token_id=0)
    config._attn_implementation = attn
    model = MistralForCausalLM(config).float()
    assert [change.source for change in instrument(model)] == ["model/attention.py"]
    return model


@pytest.mark.parametrize(("family", "attn", "chunk"), [
    ("llama", "sdpa", 5), ("llama", "eager", 5), ("llama", "sdpa", 0), ("mistral_window_3", "sdpa", 5),
    ("mistral_window_3", "eager", 0),
])
def test_pairs_sharing_their_prompt_row_give_the_two_row_log_probs_and_gradients(random_llama, family, attn, chunk):
    """One row per pair (the prompt once) gives each sequence the log-prob and gradients of its own row."""
    model = random_llama(attn=attn) if family == "llama" else sliding_mistral(attn)
    model.lm_head.weight.requires_grad_(False)
    rows = pair_rows(5, vocab=64, seed=7)
    for row in rows[:2]:  # longer than the window: the rejected response's band is measured on its positions
        row["prompt_ids"], row["chosen_ids"] = row["prompt_ids"] * 3, row["chosen_ids"] * 2
    logps = SequenceLogps(model.lm_head if chunk else None, build_sequence_logps(model, TrainerCfg()).spec)
    weights = torch.linspace(-1.0, 2.0, 10)

    def sums_and_grads(shared_mask):
        model.zero_grad(set_to_none=True)
        sums, counts = logps(model, PairCollator(0, shared_mask=shared_mask)(rows))
        (sums * weights).sum().backward()
        return sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    shared, shared_counts, shared_grads = sums_and_grads(attn)
    alone, alone_counts, alone_grads = sums_and_grads(None)
    torch.testing.assert_close(shared, alone, rtol=1e-5, atol=1e-5)
    assert torch.equal(shared_counts, alone_counts)
    assert shared_grads.keys() == alone_grads.keys() and shared_grads
    for name, grad in alone_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def dpo_objective(model, name: str = "dpo", **pref):
    cfg = RunCfg()
    cfg.objective.name, cfg.trainer = name, TrainerCfg(loss_chunk_size=7)
    for key, value in pref.items():
        setattr(cfg.pref, key, value)
    objective = build_objective(cfg)
    objective.attach(model, tokenizer=None)
    return objective


def kto_objective(model):
    return dpo_objective(model, name="kto")


def lora_llama(random_llama, seed: int = 0):
    model = get_peft_model(random_llama(seed=seed), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():  # a trained-looking adapter, so the policy is not the base
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    return model


def step_gradient(model, rows: list[dict], micro_batch: int, shared_mask: str | None = None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    collate = PairCollator(pad_token_id=0, shared_mask=shared_mask)
    batches = [collate(rows[i:i + micro_batch]) for i in range(0, len(rows), micro_batch)]
    run = SimpleNamespace(accelerator=Accelerator(cpu=True), model=model, objective=dpo_objective(model),
                          state=TrainState(), penalties=[])
    forward_backward(run, batches)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("shared_mask", [None, "sdpa"])
def test_micro_batch_2_x_accum_4_equals_8_pairs(random_llama, shared_mask):
    model, rows = lora_llama(random_llama), pair_rows(8, vocab=64, seed=3)
    whole = step_gradient(model, rows, micro_batch=8)
    split = step_gradient(model, rows, micro_batch=2, shared_mask=shared_mask)
    assert whole and whole.keys() == split.keys()
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_lora_reference_is_the_policy_with_its_adapter_disabled(random_llama):
    """The loss uses the base's log-probs as reference: equal to a hand computation with the adapter off."""
    model = lora_llama(random_llama)
    objective = dpo_objective(model)
    batch = PairCollator(pad_token_id=0)(pair_rows(3, vocab=64, seed=4))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    policy = unfused_sequence_logps(model(**inputs).logits, batch["labels"])
    with model.disable_adapter():
        base = unfused_sequence_logps(model(**inputs).logits, batch["labels"])
    margin = (policy[:3] - base[:3]) - (policy[3:] - base[3:])
    torch.testing.assert_close(objective.loss(model, batch)["loss"], -F.logsigmoid(0.1 * margin).sum(),
                               rtol=1e-5, atol=1e-6)
    assert objective.reference.describe().startswith("the base")


def test_start_adapter_is_the_reference_and_the_first_loss_is_ln2(random_llama, tmp_path):
    """A second, frozen copy of the start adapter is the reference: step 0 gives ln 2, not the base's margin."""
    from ftune.model.load import REFERENCE_ADAPTER

    trained = lora_llama(random_llama)
    trained.save_pretrained(tmp_path)
    model = lora_llama(random_llama)  # same adapter weights (same seed), loaded again as the frozen reference
    model.load_adapter(str(tmp_path), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    objective = dpo_objective(model)
    batch = PairCollator(pad_token_id=0)(pair_rows(4, vocab=64, seed=5))
    parts = objective.loss(model, batch)
    torch.testing.assert_close(parts["loss"] / 4, torch.tensor(math.log(2)), rtol=0, atol=1e-6)
    assert parts["reward_margin"].item() == pytest.approx(0.0, abs=1e-6)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # the switch gave them back
    assert model.active_adapter == "default" and "model.adapter" in objective.reference.describe()


@pytest.mark.parametrize("objective_name", ["dpo", "kto"])
def test_an_moe_policys_router_loss_comes_from_its_own_forward(objective_name):
    """The balancing loss reads the latest forward's router logits: the policy's, not the reference's."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    from ftune.data.collate import KtoCollator
    from ftune.model.moe import add_router_loss, record_router_logits

    torch.manual_seed(0)
    config = OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    base = OlmoeForCausalLM(config)
    record_router_logits(base)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.3)
    rows = pair_rows(3, vocab=64, seed=8)
    if objective_name == "dpo":
        objective, batch = dpo_objective(model), PairCollator(pad_token_id=0)(rows)
    else:
        kto_rows = [{"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"], "label": i % 2 == 0}
                    for i, r in enumerate(rows)]
        objective, batch = kto_objective(model), KtoCollator(pad_token_id=0)(kto_rows)
    parts = add_router_loss(model, batch, objective.loss(model, batch), torch.tensor(1))
    assert parts["router_loss"].requires_grad  # the policy's routers, which the loss can train
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    policy_aux = model(**inputs, output_router_logits=True).aux_loss
    torch.testing.assert_close(parts["router_loss"], policy_aux)


@pytest.mark.parametrize(("share", "expected"), [
    (True, "once per pair (one row: prompt, chosen, rejected)"),
    (False, "repeated for each response (pref.share_prompt=false)"),
])
def test_the_start_table_says_whether_pairs_share_their_prompt_row(random_llama, share, expected):
    cfg = RunCfg()
    cfg.objective.name, cfg.pref.share_prompt = "dpo", share
    objective = build_objective(cfg)
    objective.collator = PairCollator(pad_token_id=0)  # what build_loaders makes for DPO
    model = random_llama()
    objective.attach(model, tokenizer=None)
    assert objective.describe()["prompt"] == expected
    assert objective.collator.shared_mask == ("sdpa" if share else None)
    kto = RunCfg()
    kto.objective.name = "kto"
    kto_objective = build_objective(kto)
    kto_objective.attach(model, tokenizer=None)
    assert "prompt" not in kto_objective.describe()  # one response per row: nothing to share
