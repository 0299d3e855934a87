"""PEFT methods from config: target presets, LoRA options, the other PEFT methods, freezing, teacher loading."""

import pytest
import torch

from ftune.config.compose import load_run_config
from ftune.errors import ConfigError
from ftune.model.adapters import can_merge, peft_config, resolve_targets
from ftune.model.load import check_same_vocabulary, freeze_matching, load_teacher, prepare_model

LAYER_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
WORDS = ["the", "cat", "sat", "on", "a", "mat"]


def config(model_dir, *overrides: str):
    """A typed run config of the tiny_lora recipe on the model in `model_dir`."""
    typed, _ = load_run_config(["recipe=tiny_lora", f"model.name_or_path={model_dir}", *overrides])
    return typed


def adapted_modules(model) -> set[tuple[int, str]]:
    """(layer, module) of every module that got a LoRA adapter."""
    found = set()
    for name, module in model.named_modules():
        if hasattr(module, "lora_A"):
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1]) if "layers" in parts else -1
            found.add((layer, parts[-1]))
    return found


def test_target_presets_expand():
    assert resolve_targets(["all-linear"]) == "all-linear"
    assert resolve_targets(["attention"]) == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert resolve_targets(["attention", "gate_proj", "q_proj"]) == ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj"]


@pytest.mark.parametrize("targets,expected", [
    ("[all-linear]", LAYER_LINEARS),
    ("[attention]", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("[up_proj,down_proj]", {"up_proj", "down_proj"}),
])
def test_presets_resolve_to_the_expected_modules(save_llama, targets, expected):
    model = prepare_model(config(save_llama("m", WORDS), f"lora.target_modules={targets}"))
    assert adapted_modules(model) == {(layer, name) for layer in (0, 1) for name in expected}  # never lm_head
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_lora_options_reach_the_peft_config(save_llama):
    cfg = config(save_llama("m", WORDS), "lora.rslora=true", "lora.dora=true", "lora.init=gaussian",
                 "lora.modules_to_save=[lm_head]", "lora.r=4", "lora.alpha=8")
    peft = peft_config(cfg.method, cfg.lora)
    assert (peft.use_rslora, peft.use_dora, peft.init_lora_weights, peft.modules_to_save) == (
        True, True, "gaussian", ["lm_head"])
    model = prepare_model(cfg)
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / 4**0.5)  # rsLoRA: alpha / sqrt(r)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in n for n in trainable)  # DoRA
    assert any("lm_head.modules_to_save" in n for n in trainable)


@pytest.mark.parametrize("init,expected", [("default", True), ("gaussian", "gaussian"), ("pissa", "pissa"),
                                           ("olora", "olora")])
def test_init_reaches_peft(init, expected, save_llama):
    cfg = config(save_llama("m", WORDS), f"lora.init={init}")
    assert peft_config(cfg.method, cfg.lora).init_lora_weights == expected
    model = prepare_model(cfg)
    lora_b = model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight
    # Kaiming/Gaussian init starts B at zero (no change to the model); PiSSA and OLoRA start from the weights.
    assert (lora_b.abs().sum() == 0) == (init in ("default", "gaussian"))


@pytest.mark.parametrize("method,trainable_marker", [("ia3", "ia3_l"), ("prompt_tuning", "prompt_encoder"),
                                                     ("prefix_tuning", "prompt_encoder")])
def test_other_peft_methods_train_only_their_weights(save_llama, method, trainable_marker):
    model = prepare_model(config(save_llama("m", WORDS), f"method.name={method}", "method.num_virtual_tokens=3"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(trainable_marker in n for n in trainable)
    ids = torch.randint(4, 10, (2, 5))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.shape[1] == 5 + (3 if method == "prompt_tuning" else 0)  # virtual tokens come first


def test_can_merge_only_weight_deltas():
    methods = ("lora", "adalora", "vera", "loha", "lokr", "ia3", "prompt_tuning", "prefix_tuning", "full")
    assert [m for m in methods if can_merge(m)] == ["lora", "adalora", "vera", "loha", "lokr", "ia3"]


def test_freeze_patterns_freeze_exactly_the_matching_parameters(random_llama):
    model = random_llama()
    freeze_matching(model, ["embed_tokens", "layers[.]0[.]"])
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    expected = {n for n, _ in model.named_parameters() if n.startswith(("model.embed_tokens.", "model.layers.0."))}
    assert frozen == expected and len(expected) > 1


def test_full_fine_tuning_trains_everything_not_frozen(save_llama):
    model = prepare_model(config(save_llama("m", WORDS), "method.name=full", "method.freeze=[norm]"))
    for name, param in model.named_parameters():
        assert param.requires_grad == ("norm" not in name), name


def test_a_freeze_pattern_that_matches_nothing_is_an_error(random_llama):
    with pytest.raises(ConfigError, match=r"method.freeze=\['embeddings'\]: matches no parameter"):
        freeze_matching(random_llama(), ["embed_tokens", "embeddings"])


def test_teacher_is_frozen_in_eval_mode(save_llama):
    student, teacher = save_llama("student", WORDS), save_llama("teacher", WORDS)
    model = load_teacher(config(student, "method.name=full", "objective=distill", f"distill.teacher={teacher}"))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert load_teacher(config(student)) is None


@pytest.mark.parametrize("teacher_args,message", [
    ({"vocab": WORDS[::-1]}, "6 tokens differ"),
    ({"vocab": WORDS, "vocab_size": 8}, f"the teacher has 8 embedding rows for {4 + len(WORDS)} tokens"),
    ({"vocab": WORDS, "eos": "<bos>"}, "eos_token '<eos>' .student. vs '<bos>' .teacher."),
])
def test_vocabulary_mismatch_is_a_clear_error(save_llama, teacher_args, message):
    student, teacher = save_llama("student", WORDS), save_llama("teacher", **teacher_args)
    with pytest.raises(ConfigError, match=message) as err:
        check_same_vocabulary(str(student), str(teacher))
    assert f"distill.teacher={teacher}" in str(err.value) and f"model.name_or_path={student}" in str(err.value)
    check_same_vocabulary(str(student), str(save_llama("twin", WORDS)))  # same vocabulary: no error


def test_a_teacher_with_the_same_tokenizer_but_differently_padded_embeddings_distils(save_llama):
    """Qwen2.5-7B pads 151,665 tokens to 152,064 rows, the 0.5B to 151,936: the same tokenizer, so accepted."""
    student, teacher = save_llama("student", WORDS), save_llama("teacher", WORDS, vocab_size=80)
    check_same_vocabulary(str(student), str(teacher))
    model = load_teacher(config(student, "method.name=full", "objective=distill", f"distill.teacher={teacher}"))
    assert model.get_input_embeddings().weight.shape[0] == 80


@pytest.mark.parametrize("saved", [[], ["embed_tokens"]])
def test_a_tied_model_is_adapted_without_a_library_warning(tiny_model_path, saved):
    """PEFT warns when asked to keep ties it has nothing to tie; ftune asks only when an embedding trains."""
    import warnings

    cfg = config(tiny_model_path, f"lora.modules_to_save=[{','.join(saved)}]")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = prepare_model(cfg)
    assert not [str(w.message) for w in caught if "weight_tying" in str(w.message)]
    assert model.peft_config["default"].ensure_weight_tying == bool(saved)


def save_qwen2(save_llama):
    """A tiny random Qwen2 (biases on q, k and v, as Qwen2's attention has) with save_llama's tokenizer."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = save_llama("qwen2", WORDS)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def test_bitfit_trains_exactly_the_bias_terms_and_the_plan_counts_them(save_llama):
    from ftune.plan.estimate import plan_run
    from ftune.train.losses import build_step_loss

    cfg = config(save_qwen2(save_llama), "method=bitfit")
    model = prepare_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    biases = {n for n, _ in model.named_parameters() if n.endswith(".bias")}
    assert trainable == biases and len(biases) == 2 * 3  # q, k and v in each of the 2 layers
    planned = plan_run(cfg, device="cpu", step_loss=build_step_loss).trainable_params
    assert planned == sum(p.numel() for n, p in model.named_parameters() if n in biases)


def test_bitfit_on_a_model_without_biases_is_refused_before_its_weights_load(save_llama, monkeypatch, capsys,
                                                                            tmp_path):
    from ftune.cli import main

    monkeypatch.setattr("ftune.model.load.load_base_model", lambda *a, **k: pytest.fail("the weights loaded"))
    run_dir = tmp_path / "run"
    assert main(["train", "recipe=tiny_lora", f"model.name_or_path={save_llama('m', WORDS)}", "method=bitfit",
                 f"output_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "bias" in line] == [
        "ftune: error: method.train_only=['[.]bias$']: matches no parameter name of the model (names look like "
        "model.embed_tokens.weight; method=bitfit needs a model with bias terms (Qwen2's attention has them, "
        "Llama's and Mistral's have none))"]
    assert not run_dir.exists()
