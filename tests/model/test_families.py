"""The model matrix: ftune's promises on tiny random copies of today's architectures (pytest -m models).

Each family is built from its shipped official config.json by scripts/tiny_arch.py with every architectural
feature kept (see that script). Per family: LoRA (all-linear), full fine-tuning and QLoRA lower the loss; packed
loss equals unpacked loss on every CPU attention kernel the family allows, with documents longer than the
sliding window; merged logits equal adapter logits and tied embeddings stay tied; `ftune plan`'s counts equal
the instantiated model's; the GGUF export passes its llama.cpp parity checks or is refused before loading;
all-linear adapts every attention and MLP linear map (MoE experts included) and never the router or the head.
Of the zoo (scripts/arch_zoo.py: every other decoder-only causal LM of transformers), one architecture per quirk,
found by feature detection, passes the same checks (the whole zoo: scripts/model_matrix.py), and `ftune train`
runs the default LoRA recipe on OLMo 2, SmolLM3, StarCoder2, Cohere2 and OLMoE.
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ftune.config.compose import load_run_config
from ftune.errors import ConfigError
from ftune.model.adapters import expert_parameters
from ftune.model.load import load_base_model, load_tokenizer, prepare_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # scripts/ is not a package
import arch_zoo  # noqa: E402
import model_matrix as mm  # noqa: E402
import tiny_arch as builder  # noqa: E402

pytestmark = pytest.mark.models
FAMILIES = list(builder.families())
MOE = ("qwen3-30b-a3b", "mixtral-8x7b")
PACKED_TOLERANCE, MERGE_TOLERANCE = mm.PACKED_TOLERANCE, mm.MERGE_TOLERANCE
run_cfg, token_batch = mm.run_cfg, mm.token_batch


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(mm.METHODS))
def test_training_lowers_the_loss(tiny_arch, family, method):
    if method == "qlora" and family in MOE:
        with pytest.raises(ConfigError, match="^quant.bits=4 with the mixture-of-experts model.name_or_path="):
            mm.training_losses(tiny_arch(family), method)
        return
    losses = mm.training_losses(tiny_arch(family), method)
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("family", FAMILIES)
def test_all_linear_adapts_every_attention_and_mlp_map_but_never_the_router_or_head(tiny_arch, family):
    cfg = run_cfg(tiny_arch(family))
    experts = expert_parameters(load_base_model(cfg.model))
    model = prepare_model(cfg)
    layer = model.get_base_model().model.layers[0]
    wrapped = {name.removesuffix(".base_layer") for name, _ in layer.named_modules() if name.endswith("base_layer")}
    linear = {name.removesuffix(".base_layer") for name, module in layer.named_modules()
              if isinstance(module, torch.nn.Linear) and "lora_" not in name}
    assert linear <= wrapped, linear - wrapped
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in name for name in trainable)
    assert not [name for name in trainable if "lm_head" in name or ".gate." in name or "router" in name]
    if family in MOE:
        assert experts == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
        assert "mlp.experts" in wrapped and "mlp.experts.base_layer" in wrapped  # both fused weights adapted
    else:
        assert experts == []


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_equals_unpacked_loss_on_every_cpu_kernel(tiny_arch, family):
    assert len(mm.documents(load_tokenizer(run_cfg(tiny_arch(family)).model))[0]["input_ids"]) > \
        builder.SLIDING_WINDOW  # a document longer than the window: sliding layers must really slide
    for attn in mm.attention_kernels(tiny_arch(family)):
        assert mm.packed_gap(tiny_arch(family), attn) < PACKED_TOLERANCE, attn


@pytest.mark.parametrize("family", ["mistral-7b-v0.1", "gemma2-2b-it", "gemma3-1b-it", "phi3-mini-4k-instruct"])
def test_without_narrowing_the_block_mask_sliding_layers_would_see_the_whole_document(tiny_arch, family):
    """What `model/attention.py` prevents: transformers uses a 4D mask as it is, in sliding layers too."""
    from transformers import AutoModelForCausalLM

    cfg = run_cfg(tiny_arch(family), "model.attn_implementation=eager")
    plain = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, attn_implementation="eager").eval()
    packed, alone = mm.packed_and_unpacked(plain, load_tokenizer(cfg.model), "eager")
    assert abs(packed - alone) / alone > 100 * PACKED_TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_logits_equal_adapter_logits(tiny_arch, family):
    assert mm.merge_gap(tiny_arch(family)) <= MERGE_TOLERANCE


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_plan_counts_equal_the_instantiated_model(tiny_arch, family, method):
    planned, instantiated = mm.plan_and_model_counts(tiny_arch(family), method)
    assert planned == instantiated


def assert_gguf_exports_or_is_refused(path, scratch):
    """The GGUF export passes its llama.cpp parity checks, or is refused before any weights load.

    A refusal is a one-line ConfigError naming what ftune's converter does not map (the way out it names:
    format=hf, then llama.cpp's own converter).
    """
    from ftune.export.gguf_file import check_convertible, read_json

    try:
        check_convertible(mm.model_config(path), read_json(path / "tokenizer.json"))
    except ConfigError as err:
        assert err.message.startswith("format=gguf: ") and "\n" not in err.message
        with pytest.raises(ConfigError, match="^format=gguf: "):
            mm.gguf_export(path, scratch / "gguf")
        assert not (scratch / "gguf").exists()
        return
    cell = mm.gguf_cell(path, scratch)
    assert cell.passed, cell.reason


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_export_passes_parity_or_is_refused_before_loading(tiny_arch, family, tmp_path):
    pytest.importorskip("llama_cpp")
    assert_gguf_exports_or_is_refused(tiny_arch(family), tmp_path)


def test_gemma2_with_sdpa_is_refused_at_validation(tiny_arch):
    path = tiny_arch("gemma2-2b-it")
    with pytest.raises(ConfigError) as err:
        load_run_config([f"model.name_or_path={path}", "model.attn_implementation=sdpa"])
    assert str(err.value) == (f"model.attn_implementation=sdpa with model.name_or_path={path} (expected eager: "
                              "attn_logit_softcapping=50.0: sdpa cannot soft-cap attention logits (transformers "
                              "refuses it))")


@pytest.mark.parametrize("family", MOE)
def test_router_balancing_loss_is_added_with_the_configs_coefficient(tiny_arch, family):
    from ftune.model.moe import add_router_loss

    cfg = run_cfg(tiny_arch(family))
    model = prepare_model(cfg)
    ids = token_batch(load_tokenizer(cfg.model))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    with torch.no_grad():
        reference = model(**batch, output_router_logits=True).aux_loss  # transformers' own computation
        parts = add_router_loss(model, batch, {"loss": torch.tensor(10.0)}, torch.tensor(7))
    coefficient = mm.official(family)["router_aux_loss_coef"]  # Mixtral 0.02, Qwen3-MoE 0.001
    assert model.config.router_aux_loss_coef == coefficient
    torch.testing.assert_close(parts["router_loss"], 7 * reference)
    torch.testing.assert_close(parts["loss"], 10.0 + coefficient * 7 * reference)


@pytest.mark.parametrize("family", MOE)
def test_moe_lora_trains_expert_weights_and_logs_the_router_loss(tiny_arch, family, tmp_path):
    from ftune.cli import main

    path, run_dir = tiny_arch(family), tmp_path / "run"
    assert main(["train", f"model.name_or_path={path}", "lora.dropout=0", "data.train_on=everything",
                 "trainer.max_steps=3", "trainer.micro_batch_size=4", "trainer.mixed_precision=no",
                 "trainer.eval_every=0", "probe.path=null", "data.eval_path=null", "data.max_length=64",
                 "optim.lr=1e-2", f"output_dir={run_dir}"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "loss" in row]
    assert len(steps) == 3 and all(row["router_loss"] > 0 for row in steps)
    weights = load_file(run_dir / "final" / "adapter_model.safetensors")
    experts = {name: tensor.numel() for name, tensor in weights.items() if "experts" in name}
    assert experts and not [name for name in weights if ".gate." in name or "lm_head" in name]


TIED = [name for name in FAMILIES if mm.official(name).get("tie_word_embeddings", True)]


@pytest.mark.parametrize("family", TIED)
def test_tied_embeddings_stay_tied_through_modules_to_save_merge_and_reload(tiny_arch, family, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = run_cfg(tiny_arch(family), "lora.modules_to_save=[embed_tokens]")
    model = prepare_model(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)  # a trained embedding copy and adapter
    ids = token_batch(load_tokenizer(cfg.model))
    with torch.no_grad():
        adapter = model(input_ids=ids).logits
        merged = model.merge_and_unload()
        assert merged.get_output_embeddings().weight is merged.get_input_embeddings().weight
        merged.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=cfg.model.attn_implementation)
        assert (reloaded(input_ids=ids).logits - adapter).abs().max() <= MERGE_TOLERANCE * adapter.abs().max()


def test_padded_embedding_rows_are_never_generated(tiny_arch):
    """Qwen2.5-7B: 24 rows past the tokenizer here (399 in the real model); made the likeliest, still skipped."""
    from ftune.data.templates import resolve_template
    from ftune.eval.generation import greedy_answer, padding_rows

    cfg = run_cfg(tiny_arch("qwen2.5-7b-instruct"))
    tokenizer, model = load_tokenizer(cfg.model), load_base_model(cfg.model).eval()
    rows = padding_rows(model, tokenizer)
    assert rows == list(range(len(tokenizer), len(tokenizer) + 24))
    with torch.no_grad():
        model.get_output_embeddings().weight[rows] *= 100  # the padding rows now win every argmax
    seen = []
    model.register_forward_hook(lambda module, args, output: seen.append(output.logits[0, -1].argmax().item()))
    answer, new_tokens = greedy_answer(model, tokenizer, resolve_template("qwen", tokenizer),
                                  [{"role": "user", "content": "Answer with the sentence only."}], 4)
    assert new_tokens == 4 and all(token >= len(tokenizer) for token in seen)  # unsuppressed, they would win
    assert answer  # padding rows decode to nothing: the tokens generated are real ones


@pytest.mark.parametrize("family,pad", [("llama3.1-8b-instruct", "<|finetune_right_pad_id|>"),
                                        ("mistral-7b-v0.3", "</s>"), ("qwen2.5-0.5b", "<|endoftext|>")])
def test_a_missing_pad_token_gets_a_reserved_one_else_the_eos_which_stays_learned(tiny_arch, family, pad):
    from ftune.data.collate import PadCollator

    tokenizer = load_tokenizer(run_cfg(tiny_arch(family)).model)
    assert tokenizer.pad_token == pad
    eos = tokenizer.eos_token_id
    batch = PadCollator(tokenizer.pad_token_id)([{"input_ids": [5, 6, eos], "labels": [-100, 6, eos]},
                                                 {"input_ids": [7], "labels": [7]}])
    assert batch["labels"][0].tolist() == [-100, 6, eos]  # the EOS ending a learned turn keeps its label
    assert batch["labels"][1].tolist() == [7, -100, -100]  # padding is masked by position, whatever its id


def test_a_same_tokenizer_teacher_with_differently_padded_embeddings_is_accepted(tiny_arch):
    """Qwen2.5-7B-Instruct (+24 rows here, +399 real) teaches Qwen2.5-0.5B-Instruct (+16, +271 real)."""
    from ftune.model.load import check_same_vocabulary, load_teacher, shared_vocab_size

    student, teacher = tiny_arch("qwen2.5-0.5b-instruct"), tiny_arch("qwen2.5-7b-instruct")
    check_same_vocabulary(str(student), str(teacher))
    cfg = run_cfg(student, "method.name=full", "objective=distill", f"distill.teacher={teacher}")
    rows = load_teacher(cfg).get_output_embeddings().weight.shape[0]
    shared = shared_vocab_size(load_tokenizer(cfg.model))
    assert rows - shared == 24 and prepare_model(cfg).get_output_embeddings().weight.shape[0] - shared == 16


def test_a_differently_padded_same_tokenizer_pair_distils_end_to_end(tiny_arch, tmp_path):
    from ftune.cli import main

    student, teacher, run_dir = tiny_arch("qwen2.5-0.5b-instruct"), tiny_arch("qwen2.5-7b-instruct"), tmp_path / "run"
    assert main(["train", "recipe=tiny_distill", f"model.name_or_path={student}", f"distill.teacher={teacher}",
                 "trainer.max_steps=2", "trainer.micro_batch_size=4", "trainer.mixed_precision=no",
                 "trainer.eval_every=0", "probe.path=null", "data.eval_path=null", "data.max_length=256",
                 f"output_dir={run_dir}"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "kd_loss" in row] == [1, 2]


@pytest.fixture(scope="session")
def representatives():
    """Quirk -> the zoo architecture that stands for it (the first by name that has it and builds)."""
    return arch_zoo.representatives()


@pytest.mark.parametrize("check", [check for check in mm.CHECKS if check != "GGUF"])
@pytest.mark.parametrize("quirk", arch_zoo.QUIRKS)
def test_one_zoo_architecture_per_quirk_passes_the_matrix(tiny_zoo, representatives, quirk, check, tmp_path):
    assert quirk in representatives, f"no architecture of transformers {quirk} builds"
    model_type = representatives[quirk]
    cell = mm.CHECK_FUNCTIONS[check](tiny_zoo(model_type), tmp_path)
    assert cell.passed is not False, f"{model_type}: {cell.reason}"


@pytest.mark.parametrize("quirk", arch_zoo.QUIRKS)
def test_one_zoo_architecture_per_quirk_exports_gguf_or_is_refused(tiny_zoo, representatives, quirk, tmp_path):
    pytest.importorskip("llama_cpp")
    assert_gguf_exports_or_is_refused(tiny_zoo(representatives[quirk]), tmp_path)


def test_the_zoo_covers_every_decoder_and_says_why_it_leaves_the_others_out():
    built, classes = arch_zoo.architectures(), arch_zoo.causal_lm_classes()
    assert {"olmo2", "smollm3", "starcoder2", "cohere2", "olmoe", "llama", "gpt2"} <= set(built)
    assert {"bart", "bert", "whisper"} <= set(classes) - set(built)  # encoder-decoder halves, a BERT encoder
    assert arch_zoo.skip_reason("bart").startswith("encoder-decoder")
    assert arch_zoo.skip_reason("bert").startswith("bidirectional encoder")
    assert "exaone" in arch_zoo.aliases()["llama"]  # one class, built once


@pytest.mark.parametrize("model_type,reason", [
    ("cpmant", "a packed document's logits differ from its own by "),  # relative-position buckets span the row
    ("bamba", "layer_types"),  # Mamba layers carry their state along the row (ftune's mask code refuses them)
])
def test_ftune_train_refuses_packing_where_the_model_lets_documents_see_each_other(tiny_zoo, model_type, reason,
                                                                                    tmp_path, capsys):
    from ftune.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "recipe=tiny_lora", f"model.name_or_path={tiny_zoo(model_type)}", "data.packing=true",
                 "model.attn_implementation=eager", "trainer.max_steps=1", "probe.path=null", "data.eval_path=null",
                 f"output_dir={run_dir}"]) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the start table and the plan, before any training
    assert last.startswith("ftune: error: data.packing=true with ") and reason in last, last
    assert "set data.packing=false" in last and "Traceback" not in err and not run_dir.exists()


def test_a_mamba_convolution_is_not_taken_for_fused_experts(tiny_zoo):
    """Bamba's conv1d kernel is 3-D like an expert stack; a LoRA for matrices merged into it 1.4 logits off."""
    path = tiny_zoo("bamba")
    assert expert_parameters(load_base_model(run_cfg(path).model)) == []
    assert mm.merge_gap(path) <= MERGE_TOLERANCE


@pytest.mark.parametrize("model_type", ["olmo2", "smollm3", "starcoder2", "cohere2", "olmoe"])
def test_ftune_train_runs_the_default_lora_recipe(tiny_zoo, model_type, tmp_path):
    from ftune.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "recipe=tiny_lora", f"model.name_or_path={tiny_zoo(model_type)}", "trainer.max_steps=3",
                 "trainer.micro_batch_size=4", "trainer.eval_every=0", "probe.path=null", "data.eval_path=null",
                 f"output_dir={run_dir}"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3]
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
