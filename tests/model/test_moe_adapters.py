"""LoRA on a mixture-of-experts model ftune has no entry for (OLMoE): dropout, router loss and tying from modules."""

import torch
from peft.tuners.lora import ParamWrapper

from ftune.config.schema import LoraCfg, MethodCfg
from ftune.kernels.dropout import DroppedLinear
from ftune.model.adapters import add_adapter, embeddings_tied
from ftune.model.instrument import instrument
from ftune.model.moe import add_router_loss, record_router_logits


def random_olmoe(seed: int = 0):
    """A tiny random OLMoE (2 layers, 4 experts, top-2; fp32, eager) with its router logits recorded."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    config = OlmoeConfig(vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                         max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = OlmoeForCausalLM(config)
    record_router_logits(model)
    return model


def test_lora_dropout_reaches_the_linear_layers_and_spares_the_fused_experts():
    model = add_adapter(random_olmoe(), MethodCfg(name="lora"), LoraCfg(dropout=0.05), gradient_checkpointing=False)
    experts = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    linears = [m for m in model.modules() if hasattr(m, "lora_A") and not isinstance(m, ParamWrapper)]
    assert len(experts) == 4 and len(linears) == 8  # gate_up and down per layer; q, k, v, o per layer
    assert all(type(m.lora_dropout["default"]) is torch.nn.Dropout and m.lora_dropout["default"].p == 0.05
               for m in linears)
    instrument(model, kernels=True)
    assert all(type(m.lora_A["default"]) is DroppedLinear and m.lora_A["default"].p == 0.05 for m in linears)
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in experts + linears)
    assert model.peft_config["default"].lora_dropout == 0.0  # PEFT's ParamWrapper refuses any other value


def test_the_router_loss_uses_the_models_own_expert_count_top_k_and_coefficient():
    model = random_olmoe().eval()
    ids = torch.randint(3, 64, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        reference = model(**batch, output_router_logits=True).aux_loss  # transformers' own computation
        parts = add_router_loss(model, batch, {"loss": torch.tensor(10.0)}, torch.tensor(7))
    assert model.config.router_aux_loss_coef == 0.01  # OLMoE's default
    torch.testing.assert_close(parts["router_loss"], 7 * reference)
    torch.testing.assert_close(parts["loss"], 10.0 + 0.01 * 7 * reference)


def test_tied_embeddings_are_read_from_the_modules():
    from transformers import LlamaConfig, LlamaForCausalLM

    def llama(tied: bool) -> LlamaForCausalLM:
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, tie_word_embeddings=tied))

    assert embeddings_tied(llama(True)) and not embeddings_tied(llama(False))
