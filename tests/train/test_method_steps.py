"""A method's own work between optimizer steps: AdaLoRA's rank allocation and its penalty, gradual unfreezing."""

import pytest
import torch

from ftune.config.schema import AdaloraCfg, LoraCfg, MethodCfg
from ftune.errors import ConfigError
from ftune.model.adapters import add_adapter
from ftune.train.method_steps import (
    AdaloraAllocation,
    GradualUnfreezing,
    OrthogonalityPenalty,
    adalora_schedule,
    unfreezing_stages,
)

IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])


def adalora_model(random_llama, r: int = 6, target_r: int = 2):
    method = MethodCfg(name="adalora", adalora=AdaloraCfg(target_r=target_r, orth_reg_weight=0.3))
    model = add_adapter(random_llama(), method, LoraCfg(r=r, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                        gradient_checkpointing=False)
    with torch.no_grad():  # B starts at zero; move every matrix off its start so the penalty has real terms
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model, method


def test_the_orthogonality_penalty_is_the_term_peft_adds_to_a_loss_from_labels(random_llama):
    model, method = adalora_model(random_llama)
    model.train()
    with torch.no_grad():
        with_term = model(input_ids=IDS, labels=IDS).loss  # AdaLoraModel.forward adds it to the model's own loss
        plain = model.base_model.model(input_ids=IDS, labels=IDS).loss
    penalty = OrthogonalityPenalty(model, method.adalora.orth_reg_weight)
    assert len(penalty.matrices) == 2 * 2 * 2  # A and B of q and v in both layers
    torch.testing.assert_close(penalty(), with_term - plain, rtol=1e-5, atol=1e-6)


def test_the_allocation_cuts_the_mean_rank_to_the_target_and_masks_the_rest(random_llama):
    model, method = adalora_model(random_llama, r=6, target_r=2)
    steps = 10
    allocation = AdaloraAllocation(model, steps, method.adalora)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ranks = []
    for step in range(1, steps + 1):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        ranks.append(allocation.after_step(step)["mean_rank"])
        optimizer.zero_grad(set_to_none=True)
        if step == 5:  # while the budget shrinks, the checkpoint carries the importance estimates
            adapted = model.base_model.model.named_parameters()
            assert set(allocation.state_dict()["exp_avg_ipt"]) == {n for n, _ in adapted if "lora_" in n}
    tinit, tfinal = adalora_schedule(steps, method.adalora)
    assert (tinit, tfinal) == (1, 2)
    assert ranks[:tinit] == [6.0] * tinit and ranks[-tfinal:] == [2.0] * tfinal
    assert all(later <= earlier for earlier, later in zip(ranks, ranks[1:], strict=False))
    kept = sum(int((p != 0).sum()) for name, p in model.named_parameters() if "lora_E" in name)
    assert kept == 2 * 4  # target_r singular values kept per matrix on average, over the 4 adapted matrices
    pattern = allocation.state_dict()["rank_pattern"]  # and once fixed, the final allocation
    assert sum(sum(kept) for kept in pattern.values()) == 2 * 4


def test_a_schedule_without_steps_between_its_phases_is_refused():
    with pytest.raises(ConfigError, match="leave no step of this run's 4"):
        adalora_schedule(4, AdaloraCfg(warmup=0.5, final=0.4))


@pytest.mark.parametrize("tied", [False, True])
def test_stages_run_from_the_head_and_last_block_down_to_the_embedding(random_llama, tied):
    model = random_llama()
    if tied:
        model.config.tie_word_embeddings = True
        model.tie_weights()
    names = {id(p): name for name, p in model.named_parameters()}
    stages = [sorted({names[id(p)].split(".")[2] if ".layers." in names[id(p)] else names[id(p)] for p in stage})
              for stage in unfreezing_stages(model)]
    top = ["1", "lm_head.weight", "model.norm.weight"]
    if tied:  # the head is the embedding: it trains from the first step, and no stage is left for it
        assert stages == [sorted(["1", "model.embed_tokens.weight", "model.norm.weight"]), ["0"]]
    else:
        assert stages == [top, ["0"], ["model.embed_tokens.weight"]]


def test_unfreezing_trains_one_more_stage_every_n_steps_and_logs_what_trained(random_llama):
    model = random_llama()
    every = 2
    unfreezing = GradualUnfreezing(model, every)
    stage_sizes = [sum(p.numel() for p in stage) for stage in unfreezing.stages]
    unfreezing.start(0)
    trained = []
    for step in range(1, 7):
        trained.append(sum(p.numel() for p in model.parameters() if p.requires_grad))
        assert unfreezing.after_step(step) == {"trainable_params": trained[-1]}
    first, second, third = (sum(stage_sizes[:n]) for n in (1, 2, 3))
    assert trained == [first, first, second, second, third, third]
    resumed = random_llama()  # resumed after step 3, it trains in step 4 what the uninterrupted run trains
    GradualUnfreezing(resumed, every).start(3)
    uninterrupted = random_llama()
    stepped = GradualUnfreezing(uninterrupted, every)
    stepped.start(0)
    for step in range(1, 4):
        stepped.after_step(step)
    assert [p.requires_grad for p in resumed.parameters()] == [p.requires_grad for p in uninterrupted.parameters()]


def test_a_model_whose_top_trains_nothing_is_refused(random_llama):
    model = random_llama()
    for name, param in model.named_parameters():
        param.requires_grad_(".layers.0." in name)
    with pytest.raises(ConfigError, match="nothing of the head or the last block trains"):
        unfreezing_stages(model)
