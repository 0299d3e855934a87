"""Vocabulary extension (`model.add_tokens`, `model.add_special_tokens`): tokenizer, rows, training, artefacts.

The embedded model ties its head to its embedding; `untied_tiny` is a random-weight copy of its config with an
untied head, so that both kinds are checked.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from ftune.cli import main
from ftune.config.compose import ASSETS_DIR, load_run_config
from ftune.config.schema import DataCfg, DataSourceCfg, ModelCfg
from ftune.data.pipeline import split_fingerprint
from ftune.data.templates import template_for_artefact
from ftune.errors import ConfigError
from ftune.eval.probe import base_signature
from ftune.model.adapters import embeddings_tied
from ftune.model.load import (
    check_selection_before_loading,
    count_parameters,
    load_base_model,
    load_tokenizer,
    prepare_model,
)
from ftune.plan.meta import build_meta_model

TOKENS = ["model.add_tokens=['<think>']", "model.add_special_tokens=['<|end|>']"]
OLD_ROWS = 1574
"""Tokens of the embedded model's tokenizer; the two added above get ids 1574 (<think>) and 1575 (<|end|>)."""
NEW_IDS = [1574, 1575]
HIDDEN = 256
CHAT = ASSETS_DIR / "data" / "chat" / "train.jsonl"


@pytest.fixture(scope="module")
def untied_tiny(tmp_path_factory, tiny_model_path):
    """The embedded model's config with an untied head, random weights, and the embedded tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_path)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("untied") / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(path)
    return path


@pytest.fixture(params=["tied", "untied"])
def model_dir(request, tiny_model_path, untied_tiny):
    return tiny_model_path if request.param == "tied" else untied_tiny


def run_cfg(recipe: str, model_dir, *overrides: str):
    typed, _ = load_run_config([f"recipe={recipe}", f"model.name_or_path={model_dir}", *TOKENS, *overrides])
    return typed


@torch.no_grad()
def embedding_rows(model, ids: list[int]) -> torch.Tensor:
    """The input embedding's rows for `ids`, as the model's forward reads them (through PEFT's wrapper)."""
    return model.get_input_embeddings()(torch.tensor(ids))


@torch.no_grad()
def head_rows(model, ids: list[int]) -> torch.Tensor:
    """The output head's rows for `ids`, as its forward applies them: its logits of the identity, transposed."""
    return model.get_output_embeddings()(torch.eye(HIDDEN))[:, ids].T


def base_matrices(model_dir) -> tuple[torch.Tensor, torch.Tensor]:
    base = load_base_model(ModelCfg(name_or_path=str(model_dir)))
    return base.get_input_embeddings().weight.detach(), base.get_output_embeddings().weight.detach()


def test_the_tokenizer_gains_plain_and_special_tokens(tiny_model_path):
    tokenizer = load_tokenizer(ModelCfg(name_or_path=str(tiny_model_path), add_tokens=["<think>"],
                                        add_special_tokens=["<|end|>"]))
    ids = tokenizer.encode("ab<think>cd<|end|>", add_special_tokens=False)
    assert [i for i in ids if i >= OLD_ROWS] == NEW_IDS  # each one token, never split
    assert "<|end|>" in tokenizer.all_special_tokens and "<think>" not in tokenizer.all_special_tokens
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab<think>cd"


def test_a_token_the_tokenizer_has_is_refused_as_it_loads(tiny_model_path):
    """Validation reads local tokenizers; a hub model's is checked here, before its weights load."""
    with pytest.raises(ConfigError, match="model.add_special_tokens: '<\\|im_end\\|>' is already a token"):
        load_tokenizer(ModelCfg(name_or_path=str(tiny_model_path), add_special_tokens=["<|im_end|>"]))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_new_rows_start_at_the_mean_of_the_old_rows(model_dir, method):
    """Before the first step, the rows the model applies to the new ids (input and head) are the old rows' mean."""
    embedding, head = base_matrices(model_dir)
    model = prepare_model(run_cfg(f"tiny_{method}", model_dir))
    for read, old in ((embedding_rows, embedding), (head_rows, head)):
        new = read(model, NEW_IDS)
        assert torch.equal(new, old.mean(dim=0).expand_as(new))
        assert torch.equal(read(model, list(range(OLD_ROWS))), old)  # the old rows are untouched
    if method == "full":  # an adapter's tied head is checked once trained and merged
        assert embeddings_tied(model) is (model_dir.name == "tiny")
        assert model.config.vocab_size == OLD_ROWS + len(NEW_IDS)


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_an_adapter_trains_the_new_rows_alone_and_the_plan_counts_them(model_dir, method):
    cfg = run_cfg("tiny_lora", model_dir, f"method={method}")
    model = prepare_model(cfg)
    trained = [name for name, param in model.named_parameters() if param.requires_grad and "lora_" not in name]
    layers = ["embed_tokens"] if model_dir.name == "tiny" else ["embed_tokens", "lm_head"]  # a tied head follows
    assert sorted(trained) == sorted(f"base_model.model.{'model.' if layer == 'embed_tokens' else ''}{layer}."
                                     f"token_adapter.trainable_tokens_delta.default" for layer in layers)
    assert all(model.get_parameter(name).shape == (len(NEW_IDS), HIDDEN) for name in trained)
    assert count_parameters(build_meta_model(cfg, device="cpu")[0]) == count_parameters(model)


def test_full_fine_tuning_is_planned_with_the_new_rows(tiny_model_path):
    cfg = run_cfg("tiny_full", tiny_model_path)
    total, trainable = count_parameters(build_meta_model(cfg, device="cpu")[0])
    assert total == trainable == count_parameters(prepare_model(cfg))[0]


def test_a_selection_that_freezes_the_new_rows_is_refused_before_loading(tiny_model_path):
    with pytest.raises(ConfigError, match="the input embedding or the output head stays frozen"):
        check_selection_before_loading(run_cfg("tiny_full", tiny_model_path, "method.freeze=[embed_tokens]"))


def test_the_data_and_probe_caches_are_keyed_by_the_added_tokens(tiny_model_path):
    path = str(tiny_model_path)
    configs = [ModelCfg(name_or_path=path), ModelCfg(name_or_path=path, add_tokens=["<x>"]),
               ModelCfg(name_or_path=path, add_special_tokens=["<x>"])]
    sources, data = [DataSourceCfg(path=str(CHAT))], DataCfg(path=str(CHAT), eval_path=None)
    data_keys = {split_fingerprint(sources, load_tokenizer(cfg), data, 0) for cfg in configs}
    assert len(data_keys) == 3
    assert len({json.dumps(base_signature(cfg)) for cfg in configs}) == 3


def test_the_end_of_turn_refusal_names_the_route_that_works(tiny_model_path):
    plain = load_tokenizer(ModelCfg(name_or_path=str(tiny_model_path)))
    with pytest.raises(ConfigError) as refused:
        template_for_artefact(plain, DataCfg(chat_template="phi3"))
    assert "model.add_special_tokens=['<|end|>']" in refused.value.hint
    extended = load_tokenizer(ModelCfg(name_or_path=str(tiny_model_path), add_special_tokens=["<|end|>"]))
    assert template_for_artefact(extended, DataCfg(chat_template="phi3"))[1] == [OLD_ROWS, extended.eos_token_id]


def test_a_run_on_such_a_template_is_refused_before_it_trains(tmp_path, capsys):
    assert main(["train", "recipe=tiny_lora", "data.chat_template=phi3", f"output_dir={tmp_path / 'run'}"]) == 2
    assert "(add it with model.add_special_tokens=['<|end|>']" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_trained_rows_survive_saving_loading_and_merging(model_dir, tmp_path):
    """Rows set as training would, saved as final/ is: PEFT alone loads them, and `ftune merge` writes them in."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ftune.train.artefacts import trained_adapter_only

    cfg = run_cfg("tiny_lora", model_dir)
    model = prepare_model(cfg)
    torch.manual_seed(1)
    deltas = {name: torch.randn_like(param) for name, param in model.named_parameters() if "trainable_tokens" in name}
    with torch.no_grad():
        for name, value in deltas.items():
            model.get_parameter(name).copy_(value)
    final = tmp_path / "final"
    model.save_pretrained(final, **trained_adapter_only(model))
    load_tokenizer(cfg.model).save_pretrained(final)
    saved = load_file(final / "adapter_model.safetensors")
    assert not [key for key in saved if "base_layer" in key]  # the trained rows, not the grown matrices
    embedding, head = base_matrices(model_dir)
    expected = {"embed_tokens": next(v for k, v in deltas.items() if "embed_tokens" in k)}
    expected["lm_head"] = next((v for k, v in deltas.items() if "lm_head" in k), expected["embed_tokens"])

    loaded = AutoPeftModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    assert torch.equal(embedding_rows(loaded, NEW_IDS), expected["embed_tokens"])
    assert torch.equal(head_rows(loaded, NEW_IDS), expected["lm_head"])

    assert main(["merge", f"adapter={final}", f"out={tmp_path / 'merged'}"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    for module, old, layer in ((merged.get_input_embeddings(), embedding, "embed_tokens"),
                               (merged.get_output_embeddings(), head, "lm_head")):
        assert torch.equal(module.weight[NEW_IDS], expected[layer])
        assert torch.equal(module.weight[:OLD_ROWS], old)
    assert embeddings_tied(merged) is (model_dir.name == "tiny")
    assert len(AutoTokenizer.from_pretrained(tmp_path / "merged")) == OLD_ROWS + len(NEW_IDS)


SHORT = ["trainer.max_steps=2", "trainer.eval_every=0", "probe.path=null", "data.chat_template=phi3"]
"""Two steps on the phi3 template, whose end-of-turn `<|end|>` the embedded tokenizer lacks: `TOKENS` adds it."""


@pytest.fixture(scope="module")
def batch_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "batch.jsonl"
    path.write_text("\n".join(CHAT.read_text().splitlines()[:8]) + "\n")
    return path


def train(recipe: str, run_dir, data) -> None:
    assert main(["train", f"recipe={recipe}", *TOKENS, *SHORT, f"data.path={data}", f"data.eval_path={data}",
                 f"output_dir={run_dir}"]) == 0


@pytest.mark.slow
def test_a_lora_run_trains_the_new_rows_into_its_adapter_and_merged_model(tmp_path, batch_file, tiny_model_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train("tiny_lora", tmp_path / "run", batch_file)
    final = tmp_path / "run" / "final"
    trained = load_file(final / "adapter_model.safetensors")
    delta = trained["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
    embedding, _ = base_matrices(tiny_model_path)
    assert not torch.equal(delta, embedding.mean(dim=0).expand_as(delta))  # the rows trained
    assert json.loads((final / "generation_config.json").read_text())["eos_token_id"][0] == NEW_IDS[1]

    adapted = AutoPeftModelForCausalLM.from_pretrained(final, dtype=torch.float32)  # PEFT alone
    assert torch.equal(embedding_rows(adapted, NEW_IDS), delta)
    assert main(["merge", f"adapter={final}", f"out={tmp_path / 'merged'}"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    weight = merged.get_input_embeddings().weight
    assert torch.equal(weight[NEW_IDS], delta) and torch.equal(weight[:OLD_ROWS], embedding)  # only the new rows
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tokenizer.convert_tokens_to_ids(["<think>", "<|end|>"]) == NEW_IDS
    ids = torch.tensor([tokenizer.encode("<think>hi<|end|>", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_a_full_run_on_a_template_whose_end_of_turn_was_added(tmp_path, batch_file, tiny_model_path):
    from transformers import AutoTokenizer

    train("tiny_full", tmp_path / "run", batch_file)
    final = tmp_path / "run" / "final"
    weights = load_file(final / "model.safetensors")["model.embed_tokens.weight"]
    embedding, _ = base_matrices(tiny_model_path)
    assert weights.shape == (OLD_ROWS + len(NEW_IDS), HIDDEN)
    assert not torch.equal(weights[NEW_IDS[1]], embedding.mean(dim=0))  # <|end|> is learned at every turn's end
    assert json.loads((final / "generation_config.json").read_text())["eos_token_id"] == [NEW_IDS[1], 2]
    assert "<|end|>" in AutoTokenizer.from_pretrained(final).all_special_tokens
