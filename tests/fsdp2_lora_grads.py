"""One LoRA step of a random Llama sharded by FSDP2 over 2 gloo processes (test helper; run with torchrun).

Run by tests/model/test_lora_linear.py. Rank 0 prints, as JSON, the sharded step's loss, the unsharded step's loss
on the same rank, the largest relative difference of any adapter gradient between the two, and how many times the
fused LoRA layer's autograd function ran in the sharded step. FSDP2 gathers a whole decoder layer before its
forward and frees it after, so the fused layer's direct reads of its children's weights must see gathered ones.
"""

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import ftune.model.lora_linear as lora_linear
from ftune.config.schema import LoraCfg, MethodCfg
from ftune.model.adapters import add_adapter

SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def lora_model(dropout: float) -> torch.nn.Module:
    """The same random Llama with LoRA on every linear (ftune's fused layers), B drawn so the adapter acts."""
    torch.manual_seed(0)
    model = add_adapter(LlamaForCausalLM(LlamaConfig(**SHAPE)), MethodCfg(name="lora"),
                        LoraCfg(r=4, alpha=8, dropout=dropout, target_modules=["all-linear"]), False)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param)
    return model.train()


def step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and the whole (gathered) gradient of each trainable parameter, dropout drawn from one seed."""
    torch.manual_seed(3)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
             for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


FUSED = lora_linear._LoraMatmul


class CountedLoraMatmul(FUSED):
    """The fused layer's function, counting its forwards."""

    calls = 0

    @staticmethod
    def forward(ctx, *args):
        CountedLoraMatmul.calls += 1
        return FUSED.forward(ctx, *args)


def main(dropout: float) -> None:
    dist.init_process_group("gloo")
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(1))
    whole_loss, whole = step(lora_model(dropout), ids)
    model = lora_model(dropout)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    lora_linear._LoraMatmul = CountedLoraMatmul
    sharded_loss, sharded = step(model, ids)
    worst = max(((sharded[k] - whole[k]).norm() / whole[k].norm()).item() for k in whole)
    if dist.get_rank() == 0:
        print(json.dumps({"sharded_loss": sharded_loss, "whole_loss": whole_loss, "worst_grad_diff": worst,
                          "gradients": [len(whole), len(sharded)], "fused_calls": CountedLoraMatmul.calls}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(float(sys.argv[1]))
