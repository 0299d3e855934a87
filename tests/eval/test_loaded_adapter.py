"""A saved adapter loaded by `load_adapted` (`ftune eval`, `ftune merge`) computes exactly what it trained as.

PEFT's own LoRA layer rounds the base and adapter outputs to bf16 separately before adding them, where training's
`FusedLoraLinear` adds them in one product: loaded that way, an adapter evaluated 1e-3 away from its run's log.
"""

import pytest
import torch

from ftune.config.schema import LoraCfg, MethodCfg
from ftune.eval.loss import autocast_forward
from ftune.model.adapters import add_adapter
from ftune.model.instrument import instrument
from ftune.model.merge import load_adapted


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_a_loaded_adapter_computes_what_the_trained_one_did(tmp_path, random_llama, mixed_precision):
    base = tmp_path / "base"
    random_llama().save_pretrained(base)
    trained = add_adapter(random_llama(), MethodCfg(), LoraCfg(), gradient_checkpointing=False)
    instrument(trained, trains=True, kernels=True)  # as `ftune train` on a CPU (trainer.cpu_kernels=auto)
    torch.manual_seed(1)
    for name, weight in trained.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: an adapter that changed nothing would hide the difference
            weight.data.normal_(0.0, 0.5)
    trained.save_pretrained(tmp_path / "adapter")
    loaded = load_adapted(str(base), str(tmp_path / "adapter"), "fp32")
    inputs = {"input_ids": torch.randint(0, 64, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    logits = []
    for model in (trained.eval(), loaded.eval()):
        autocast_forward(model, mixed_precision)
        with torch.no_grad():
            logits.append(model(**inputs).logits)
    assert torch.equal(logits[0], logits[1])
