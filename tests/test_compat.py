"""`ftune.compat`: the upstream behaviour behind each fenced library internal, on tiny objects.

One test per internal. When a library release moves one, its test fails with one message naming the library,
the installed version, the version `ftune.compat` was checked on and what moved (`fenced`); CI's newest-versions
mode (`FTUNE_DEPS=latest bash .ci/run`) runs these first thing a release lands. docs/design.md ("Library
internals") says how to update a fence.
"""

import contextlib
import importlib
import importlib.metadata
import inspect

import jinja2
import pytest
import torch
from torch import nn

from ftune import compat

CHECKED_ON = {"transformers": "5.25.0", "peft": "0.21.2", "torch": "2.13.0", "datasets": "5.2.0",
              "bitsandbytes": "0.50.2"}
"""The release of each library that ftune.compat's fences were last checked against (constraints.txt's pins)."""


@contextlib.contextmanager
def fenced(library: str, internal: str):
    """Turn any failure inside (an assertion, or the internal gone) into one message saying what moved."""
    try:
        yield
    except Exception as err:  # AssertionError with the test's words, or ImportError/AttributeError/TypeError
        installed = importlib.metadata.version(library)
        pytest.fail(f"{library} {installed} moved {internal} (checked on {CHECKED_ON[library]}): "
                    f"{type(err).__name__}: {err}")


TEMPLATE = """{%- for message in messages %}
    {%- if message['role'] == 'system' and not loop.first %}
        {{- raise_exception('the system turn must come first') }}
    {%- endif %}
<{{ message['role'] }}>{{ message['content'] | trim }}{{ eos_token }}
{% endfor %}
{%- if tools %}{{ tools | tojson }}{% endif %}
{%- if add_generation_prompt %}<assistant>{% endif %}"""
"""Needs what ftune's templates use: trim_blocks and lstrip_blocks, `raise_exception`, the tojson filter, the
tokenizer's special tokens."""


def test_compile_chat_template_renders_like_apply_chat_template(tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    messages = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "Hi"}]
    tools = [{"type": "function", "function": {"name": "now", "parameters": {"type": "object"}}}]
    with fenced("transformers", "_compile_jinja_template"):
        template = compat.compile_chat_template(TEMPLATE)
        rendered = template.render(messages=messages, tools=tools, documents=None, add_generation_prompt=True,
                                   **tokenizer.special_tokens_map)
        expected = tokenizer.apply_chat_template(messages, tools=tools, chat_template=TEMPLATE,
                                                 add_generation_prompt=True, tokenize=False)
        assert rendered == expected, "the compiled template no longer renders what apply_chat_template renders"
        assert compat.compile_chat_template(TEMPLATE) is template, "compiled templates are no longer cached"
        with pytest.raises(jinja2.TemplateError, match="the system turn must come first"):
            template.render(messages=messages[::-1], add_generation_prompt=False)


def tiny_moe(family: str):
    """A tiny random Mixtral or Qwen3-MoE (2 layers, 4 experts, top-2) in fp32."""
    import transformers

    config_class, model_class = {
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    }[family]
    torch.manual_seed(0)
    experts = {"num_local_experts": 4} if family == "mixtral" else {"num_experts": 4, "moe_intermediate_size": 16}
    config = config_class(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, num_experts_per_tok=2, head_dim=8,
                          max_position_embeddings=64, **experts)
    return model_class(config).eval()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_recorded_router_output_is_the_models_router_logits(family):
    model = tiny_moe(family)
    with fenced("transformers", "_can_record_outputs / OutputRecorder"):
        found = compat.recorded_output(model, "router_logits")
        assert found is not None, f"{type(model).__name__} declares no recorded router_logits"
        target, index = found
        recorded = []
        for module in model.modules():
            if isinstance(module, target):
                module.register_forward_hook(lambda module, args, output: recorded.append(output[index]))
        ids = torch.randint(0, 64, (2, 6))
        with torch.no_grad():
            own = model(input_ids=ids, output_router_logits=True).router_logits
        assert len(recorded) == len(own) == 2, f"{target.__name__} does not run once per MoE layer"
        for mine, theirs in zip(recorded, own, strict=True):
            torch.testing.assert_close(mine, theirs, msg=f"output {index} of {target.__name__} is not the logits")
        assert compat.recorded_output(model, "no_such_output") is None


def switch_loss(logits: tuple[torch.Tensor, ...], experts: int, top_k: int, mask: torch.Tensor | None) -> torch.Tensor:
    """The Switch-Transformer balancing loss by hand, over every layer's tokens but padding (mask 0).

    experts * the sum over experts of (its share of the top-k picks) x (its mean router probability).
    """
    probs = torch.cat(logits).softmax(-1)
    picked = nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, experts).sum(1).float()
    weight = torch.ones(len(probs)) if mask is None else mask.reshape(-1).float().repeat(len(logits))
    share = (picked * weight[:, None]).sum(0) / weight.sum()
    prob = (probs * weight[:, None]).sum(0) / weight.sum()
    return experts * (share * prob).sum()


def test_load_balancing_loss_is_the_switch_transformer_formula():
    generator = torch.Generator().manual_seed(3)
    logits = tuple(torch.randn(2 * 5, 4, generator=generator) for _ in range(3))  # 3 layers, 2 rows x 5 tokens
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with fenced("transformers", "mixtral's load_balancing_loss_func"):
        for padding in (None, mask):
            torch.testing.assert_close(compat.load_balancing_loss(logits, 4, 2, padding),
                                       switch_loss(logits, 4, 2, padding),
                                       msg=f"the loss differs from the hand formula (mask: {padding is not None})")


def test_the_cache_keyword_returns_a_cache_that_forward_continues_from_without_a_warning(random_llama):
    import warnings

    model = random_llama().eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with fenced("transformers", "the KV cache's name (cache, formerly past_key_values)"), torch.no_grad():
        whole = model(input_ids=ids).logits[:, -1]
        keyword = compat.cache_keyword()
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            cache = getattr(model(input_ids=ids[:, :-1], use_cache=True), keyword)
            last = model(input_ids=ids[:, -1:], use_cache=True, **{keyword: cache}).logits[:, -1]
        assert cache.get_seq_length() == 4, f"the cache holds {cache.get_seq_length()} positions after 4 tokens"
        torch.testing.assert_close(last, whole, rtol=1e-5, atol=1e-6)


def test_modules_kept_unquantized_are_the_head_alone(random_llama):
    model = random_llama()
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    with fenced("transformers", "quantizers.base.get_keys_to_not_convert"):
        kept = set(compat.modules_kept_unquantized(model))
        assert kept & linears == {"lm_head"}, f"the linears kept unquantized are {sorted(kept & linears)}"


def test_module_to_run_is_what_modules_to_save_wrapper_runs():
    from peft import LoraConfig, get_peft_model

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj, self.head = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.proj(x))

    torch.manual_seed(0)
    model = get_peft_model(Model(), LoraConfig(r=2, target_modules=["proj"], modules_to_save=["head"]))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["proj"]))  # no copy of the head
    head, x = model.base_model.model.head, torch.randn(2, 4)
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(1.0)  # the trained copy differs from the original
    cases = [("enabled", contextlib.nullcontext, "default"), ("disabled", model.disable_adapter, "default"),
             ("another adapter active", contextlib.nullcontext, "plain")]
    with fenced("peft", "ModulesToSaveWrapper.forward's choice of module"):
        for case, context, adapter in cases:
            model.set_adapter(adapter)
            with context(), torch.no_grad():
                assert torch.equal(compat.module_to_run(head)(x), head(x)), f"adapters {case}: another module runs"
        assert compat.module_to_run(head.original_module) is head.original_module


def test_dataset_hash_follows_the_content(tmp_path):
    import datasets

    def saved(name: str, texts: list[str]):
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(tmp_path / name)
        return datasets.load_from_disk(tmp_path / name)

    with fenced("datasets", "Dataset._fingerprint"):
        first = compat.dataset_hash(saved("a", ["x", "y"]))
        assert isinstance(first, str) and first, f"the fingerprint is {first!r}"
        assert compat.dataset_hash(datasets.load_from_disk(tmp_path / "a")) == first, "a reload changes it"
        assert compat.dataset_hash(saved("b", ["x", "z"])) != first, "other content keeps the same fingerprint"


def test_fake_mode_is_seen_only_inside_fake_tensor_mode():
    with fenced("torch", "_guards.detect_fake_mode"):
        mode = compat.fake_mode()
        assert not compat.fake_mode_active(), "a fake mode is reported outside any"
        with mode:
            assert compat.fake_mode_active(), "FakeTensorMode is not detected"
        assert not compat.fake_mode_active()


def test_fake_tensors_have_shapes_and_dtypes_without_data():
    with fenced("torch", "_subclasses.fake_tensor (FakeTensorMode, FakeTensor)"):
        mode = compat.fake_mode()
        weight = compat.fake_like(mode, torch.empty(3, 4, dtype=torch.bfloat16, device="meta"), torch.device("cpu"))
        assert (weight.shape, weight.dtype, weight.device.type) == ((3, 4), torch.bfloat16, "cpu")
        with mode:
            out = torch.ones(5, 4, dtype=torch.bfloat16) @ weight.t()
        assert (out.shape, out.dtype, out.device.type) == ((5, 3), torch.bfloat16, "cpu")
        assert type(out) is type(weight), "operations in the mode no longer give fake tensors"


def test_dispatch_mode_sees_every_aten_operation_below_autograd():
    seen = []

    def handler(func, args, kwargs):
        seen.append(func)
        return func(*args, **kwargs)

    x = torch.randn(3, requires_grad=True)
    with fenced("torch", "utils._python_dispatch.TorchDispatchMode"):
        with compat.dispatch_mode(handler):
            y = (x * 2).sum()
        assert torch.ops.aten.mul.Tensor in seen and torch.ops.aten.sum.default in seen, f"seen: {seen}"
        y.backward()
        assert torch.equal(x.grad, torch.full((3,), 2.0)), "autograd no longer records above the mode"


def test_storage_key_tells_storages_apart_on_real_and_fake_tensors():
    with fenced("torch", "UntypedStorage._cdata"):
        mode = compat.fake_mode()
        fake = compat.fake_like(mode, torch.empty(2, 3, device="meta"), torch.device("cpu"))
        for tensor in (torch.zeros(2, 3), fake):
            with mode if tensor is fake else contextlib.nullcontext():
                other = tensor + 1
            assert isinstance(compat.storage_key(tensor), int)
            assert compat.storage_key(tensor[1]) == compat.storage_key(tensor.t()) == compat.storage_key(tensor), \
                "views no longer share their storage's key"
            assert compat.storage_key(other) != compat.storage_key(tensor), "two storages share a key"


def test_grouped_mm_op_is_what_grouped_mm_dispatches_and_its_fake_kernel_still_refuses_fp32():
    """When the fake kernel takes fp32, `ftune.plan.trace.fake_kernel`'s bf16 detour can go."""
    a, b, offsets = torch.randn(4, 8), torch.randn(2, 8, 8), torch.tensor([2, 4], dtype=torch.int32)
    seen = []

    def handler(func, args, kwargs):
        seen.append(func)
        return func(*args, **kwargs)

    with fenced("torch", "aten._grouped_mm"):
        with compat.dispatch_mode(handler):
            torch.nn.functional.grouped_mm(a, b, offs=offsets)
        assert compat.grouped_mm_op() in seen, f"grouped_mm dispatched {seen}"
        mode = compat.fake_mode()
        fakes = [compat.fake_like(mode, t.to("meta"), torch.device("cpu")) for t in (a, b, offsets)]
        with mode:
            assert compat.grouped_mm_op()(fakes[0].bfloat16(), fakes[1].bfloat16(), fakes[2]).shape == (4, 8)
            with pytest.raises(RuntimeError, match="BF16"):
                compat.grouped_mm_op()(*fakes)


def test_convolution_base_is_every_convolutions_base():
    layers = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
              nn.LazyConv1d)
    with fenced("torch", "nn.modules.conv._ConvNd"):
        base = compat.convolution_base()
        assert all(issubclass(layer, base) for layer in layers), f"not every convolution is a {base.__name__}"
        assert not issubclass(nn.Linear, base)


def test_cpu_repacking_switch_keeps_4bit_weights_trainable():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    with fenced("bitsandbytes", "Linear4bit.support_avx512bf16_for_cpu"):
        assert "support_avx512bf16_for_cpu" in inspect.getsource(bnb.nn.Linear4bit.forward), \
            "Linear4bit's forward no longer reads the switch"
        compat.turn_off_cpu_repacking(layer)
        x = torch.randn(3, 64)
        with torch.no_grad():
            layer.eval()(x)  # where bitsandbytes would repack, on a CPU with AVX512-BF16
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False), "the weight was repacked"
        layer.train()(x.requires_grad_()).sum().backward()
        assert x.grad is not None, "the gradient no longer reaches the input"


def test_the_silenced_bitsandbytes_logger_is_its_cpu_kernel_loaders():
    pytest.importorskip("bitsandbytes")
    with fenced("bitsandbytes", "the logger of backends.cpu.ops"):
        module = importlib.import_module(compat.BITSANDBYTES_CPU_LOGGER)
        assert module.logger.name == compat.BITSANDBYTES_CPU_LOGGER, f"its logger is {module.logger.name!r}"
        assert "get_kernel" in inspect.getsource(module), "it no longer loads the optional hub kernel"
