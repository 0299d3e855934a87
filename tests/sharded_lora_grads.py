"""One LoRA step of a random Llama sharded over 2 gloo processes, FSDP2 or DeepSpeed ZeRO-3 (test helper).

Run with torchrun by tests/kernels/test_lora_linear.py: `sharded_lora_grads.py fsdp2|zero3 DROPOUT`. Rank 0 prints,
as JSON, the sharded step's loss, the unsharded step's loss on the same rank, the largest relative difference of
any adapter gradient between the two, and how many times the fused LoRA layer's autograd function ran in the
sharded step. The fused layer reads its children's weights (base_layer, lora_A, lora_B) without calling them:
FSDP2 gathers a whole decoder layer before its forward, ZeRO-3 gathers a parameter when a forward reads it.
"""

import json
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import ftune.kernels.lora_linear as lora_linear
from ftune.config.schema import LoraCfg, MethodCfg
from ftune.model.adapters import add_adapter
from ftune.model.instrument import instrument

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
FUSED = lora_linear._LoraMatmul


class CountedLoraMatmul(FUSED):
    """The fused layer's function, counting its forwards."""

    calls = 0

    @staticmethod
    def forward(ctx, *args):
        CountedLoraMatmul.calls += 1
        return FUSED.forward(ctx, *args)


def lora_model(dropout: float) -> torch.nn.Module:
    """The same random Llama with LoRA on every linear (ftune's fused layers), B drawn so the adapter acts."""
    torch.manual_seed(0)
    model = add_adapter(LlamaForCausalLM(LlamaConfig(**SHAPE)), MethodCfg(name="lora"),
                        LoraCfg(r=4, alpha=8, dropout=dropout, target_modules=["all-linear"]), False)
    instrument(model, kernels=True)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    return model.train()


def forward_backward(model, ids: torch.Tensor, backward) -> float:
    """The loss of one step, its gradient computed by `backward`, dropout drawn from one seed."""
    torch.manual_seed(3)
    loss = model(input_ids=ids, labels=ids).loss
    backward(loss)
    return loss.item()


def fsdp2_step(dropout: float, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gathered gradients of the step under FSDP2, sharded per decoder layer as ftune's fsdp.yaml wraps."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = lora_model(dropout)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    loss = forward_backward(model, ids, torch.Tensor.backward)
    return loss, {name: p.grad.full_tensor() for name, p in model.named_parameters() if p.grad is not None}


def zero3_step(dropout: float, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gathered gradients of the step under DeepSpeed ZeRO-3 (the optimizer never steps: lr 0)."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    model = lora_model(dropout)
    trainable = [p for p in model.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": len(ids), "zero_optimization": {"stage": 3},
              "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config,
                                      optimizer=torch.optim.SGD(trainable, lr=0.0))
    loss = forward_backward(engine, ids, engine.backward)
    return loss, {name: safe_get_full_grad(p) for name, p in model.named_parameters() if p.requires_grad}


def main(sharding: str, dropout: float) -> None:
    dist.init_process_group("gloo")
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(1))
    whole_model = lora_model(dropout)
    whole_loss = forward_backward(whole_model, ids, torch.Tensor.backward)
    whole = {name: p.grad for name, p in whole_model.named_parameters() if p.grad is not None}
    lora_linear._LoraMatmul = CountedLoraMatmul
    sharded_loss, sharded = {"fsdp2": fsdp2_step, "zero3": zero3_step}[sharding](dropout, ids)
    worst = max(((sharded[k] - whole[k]).norm() / whole[k].norm()).item() for k in whole)
    if dist.get_rank() == 0:
        print(json.dumps({"sharded_loss": sharded_loss, "whole_loss": whole_loss, "worst_grad_diff": worst,
                          "gradients": [len(whole), len(sharded)], "fused_calls": CountedLoraMatmul.calls}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
