"""NEFTune (`trainer.neftune_alpha`): noise on the input embeddings in training forwards, none anywhere else."""

import math

import pytest
import torch

from ftune.cli import main
from ftune.model.dropout import eval_mode
from ftune.model.instrument import instrument

ALPHA = 5.0


def embedded(model, ids: torch.Tensor) -> torch.Tensor:
    """The input embeddings' output for `ids`, hooks included."""
    return model.get_input_embeddings()(ids)


def test_training_forwards_get_uniform_noise_of_the_papers_scale_and_eval_forwards_none(random_llama):
    model = random_llama()
    clean = model.get_input_embeddings().weight[torch.arange(40).view(2, 20)].detach()
    changes = instrument(model, trains=True, neftune_alpha=ALPHA)
    assert any("NEFTune" in change.what for change in changes)
    ids = torch.arange(40).view(2, 20)
    noise = (embedded(model.train(), ids) - clean).detach()
    bound = ALPHA / math.sqrt(20 * model.config.hidden_size)  # alpha / sqrt(L x d)
    assert noise.abs().max() <= bound * (1 + 1e-6) and noise.abs().max() > 0.9 * bound
    assert not torch.equal(embedded(model, ids), embedded(model, ids))  # drawn afresh each forward
    with eval_mode(model), torch.no_grad():
        assert torch.equal(embedded(model, ids), clean)


def test_a_model_that_does_not_train_gets_no_noise(random_llama):
    model = random_llama()
    assert instrument(model, trains=False, neftune_alpha=ALPHA) == []


@pytest.mark.parametrize("objective", ["dpo", "grpo"])
def test_neftune_with_a_preference_or_rl_objective_is_refused(objective, capsys):
    recipe = {"dpo": "tiny_dpo", "grpo": "tiny_grpo"}[objective]
    assert main(["train", f"recipe={recipe}", f"trainer.neftune_alpha={ALPHA}"]) == 2
    assert f"trainer.neftune_alpha={ALPHA} with objective={objective} (expected objective=sft or distill" in \
        capsys.readouterr().err
