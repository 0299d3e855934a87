"""QLoRA on the embedded model: a 4-bit base that stays fixed under LoRA adapters that train."""

import sys

import pytest
import torch

from ftune.config.compose import load_run_config
from ftune.config.schema import QuantCfg
from ftune.errors import ResourceError
from ftune.model.dtypes import quant_compute_dtype
from ftune.model.load import count_parameters, load_teacher, prepare_model
from ftune.model.quant import bnb_config, student_load_kwargs
from ftune.train.optim import build_optimizer

bnb = pytest.importorskip("bitsandbytes")


def qlora_config(*overrides: str):
    typed, _ = load_run_config(["recipe=tiny_qlora", *overrides])
    return typed


@pytest.fixture(scope="module")
def qlora_model():
    return prepare_model(qlora_config())


def test_base_linears_are_4bit_except_the_head(qlora_model):
    linears = {n: m for n, m in qlora_model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n}
    quantized = {n for n, m in linears.items() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized and all(n.endswith(".base_layer") for n in quantized)  # each wrapped by a LoRA layer
    assert set(linears) - quantized == {"base_model.model.lm_head"}
    assert {m.weight.quant_type for n, m in linears.items() if n in quantized} == {"nf4"}


def test_only_adapter_weights_require_grad(qlora_model):
    trainable = [n for n, p in qlora_model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert qlora_model.base_model.model.is_gradient_checkpointing  # on by default in the QLoRA recipes


def test_steps_change_the_lora_weights_and_nothing_else(qlora_model):
    # The quantized weights, their quantization state and every other base tensor are in the state dict.
    before = {k: v.clone() for k, v in qlora_model.state_dict().items()}
    optimizer = build_optimizer(qlora_model, qlora_config("optim.lr=1e-2").optim)
    ids = torch.randint(10, 200, (2, 12))
    qlora_model.train()
    for _ in range(3):
        logits = qlora_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = qlora_model.state_dict()
    changed = {k for k, v in after.items() if not torch.equal(v, before[k])}
    lora = {k for k in after if ".lora_A." in k or ".lora_B." in k}
    assert changed == lora


def test_parameter_counts_unpack_4bit_weights(qlora_model):
    assert count_parameters(qlora_model) == count_parameters(prepare_model(qlora_config("quant.bits=0")))


def test_bnb_config_follows_quant_settings():
    four = bnb_config(QuantCfg(type="fp4", double_quant=False, compute_dtype="fp32"), 4)
    assert (four.load_in_4bit, four.bnb_4bit_quant_type, four.bnb_4bit_use_double_quant) == (True, "fp4", False)
    assert four.bnb_4bit_compute_dtype == torch.float32
    assert bnb_config(QuantCfg(), 8).load_in_8bit
    assert student_load_kwargs(qlora_config("quant.bits=0")) == {}


@pytest.mark.parametrize(("cpu_bf16", "expected"), [("0", torch.float32), ("1", torch.bfloat16)])
def test_auto_compute_dtype_is_bf16_only_where_it_is_native(cpu_bf16, expected, monkeypatch):
    """QLoRA's default: emulated bf16 matmuls on a CPU without bf16 instructions are many times slower than fp32."""
    monkeypatch.setenv("FTUNE_CPU_BF16", cpu_bf16)
    assert load_run_config(["recipe=tiny_qlora"])[0].quant.compute_dtype == "auto"
    assert bnb_config(QuantCfg(compute_dtype="auto"), 4).bnb_4bit_compute_dtype == expected
    assert quant_compute_dtype("auto", "cuda") == torch.bfloat16  # planned for a GPU (bf16 assumed)
    assert quant_compute_dtype("fp16", "cpu") == torch.float16  # a named dtype is kept


@pytest.mark.parametrize("bits,layer", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_teacher_loads_quantized_and_runs(tiny_model_path, bits, layer):
    cfg = qlora_config("quant.bits=0", "method.name=full", "objective=distill", f"distill.teacher={tiny_model_path}",
                       f"distill.teacher_bits={bits}")
    teacher = load_teacher(cfg)
    assert any(isinstance(m, getattr(bnb.nn, layer)) for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    with torch.no_grad():
        logits = teacher(input_ids=torch.randint(10, 200, (2, 12))).logits
    assert logits.shape[:2] == (2, 12) and torch.isfinite(logits).all()


def test_unusable_bitsandbytes_is_a_clear_error(monkeypatch):
    cfg = qlora_config()
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # installed, but its import fails
    with pytest.raises(ResourceError, match="quant.bits=4: bitsandbytes is not usable here"):
        prepare_model(cfg)


def test_evaluation_does_not_stop_gradients_through_the_4bit_base(qlora_model):
    ids = torch.randint(10, 200, (2, 12))
    qlora_model.eval()
    with torch.no_grad():  # what evaluation and the forgetting probe do before training goes on
        qlora_model(input_ids=ids)
    qlora_model.train()
    qlora_model(input_ids=ids).logits.float().pow(2).mean().backward()
    first_b = qlora_model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert first_b.grad is not None and first_b.grad.abs().sum() > 0  # reached through every 4-bit layer above
    qlora_model.zero_grad()


@pytest.mark.skipif(not bnb.functional.has_avx512bf16(), reason="the repacking only happens on AVX512-BF16 CPUs")
@pytest.mark.filterwarnings("ignore:bitsandbytes..gemv_4bit. an autograd kernel was not registered")
def test_bitsandbytes_cpu_repacking_still_breaks_training():
    """Upstream behaviour that `quant.disable_cpu_inference_repacking` works around; when this fails, drop it."""
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    x = torch.randn(3, 64)
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.train()
    x.requires_grad_()
    layer(x).sum().backward()
    assert x.grad is None  # the gradient no longer reaches the input (torch warns of a missing autograd kernel)
