"""Dropout turned off for forwards that must not draw masks: torch's modules and the CPU kernels' alike."""

import pytest
import torch
from torch import nn

from ftune.kernels.dropout import DroppedLinear
from ftune.model.dropout import disable_dropout, eval_mode


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_gives_the_model_back_in_its_mode_even_when_the_block_raises(training):
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)).train(training)
    with eval_mode(model):
        assert not model.training and not model[1].training
    assert model.training == training
    with pytest.raises(ValueError), eval_mode(model):
        raise ValueError("inside")
    assert model.training == training and model[1].training == training


def test_disable_dropout_turns_off_torch_and_kernel_dropout_in_training_mode():
    model = nn.Sequential(nn.Dropout(0.5), DroppedLinear(nn.Linear(4, 4), 0.5)).train()
    x = torch.ones(64, 4)
    disable_dropout(model)
    assert model.training
    torch.testing.assert_close(model(x), model[1].weight.new_ones(64, 4) @ model[1].weight.t() + model[1].bias)
