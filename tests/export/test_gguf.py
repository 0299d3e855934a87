"""format=gguf: the file carries ftune's tokenizer and template, and llama.cpp computes what transformers does.

The metadata test needs only the `gguf` package; the others read the file back with llama-cpp-python (the
`ftune[gguf]` extra) and are skipped without it.
"""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftune.cli import main

gguf = pytest.importorskip("gguf")

IDS = [[5, 17, 42, 99, 7, 256, 31, 8], [64, 3, 12, 12, 600, 77, 5, 19, 1, 2]]
"""Token ids of the test's own probe (special tokens included), independent of the export's checks."""
PROMPTS = ["Tell me about the weather.", "What do cats like?", "Say ran in the present."]


def gguf_file(out):
    (path,) = out.glob("*.gguf")
    return path


def field(reader, key):
    return reader.fields[key].contents()


def test_the_file_holds_the_tokenizer_its_special_tokens_and_the_chat_template(tiny_model_path, tmp_path):
    from ftune.export.gguf_file import write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_model_path, path, "f16", "tiny")
    reader = gguf.GGUFReader(path)
    tokenizer = json.loads((tiny_model_path / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.tokens") == sorted(vocab, key=vocab.get)
    types = field(reader, "tokenizer.ggml.token_type")
    assert types[:4] == [gguf.TokenType.CONTROL] * 4 and set(types[4:]) == {gguf.TokenType.NORMAL}
    assert len(field(reader, "tokenizer.ggml.merges")) == len(tokenizer["model"]["merges"])
    assert (field(reader, "tokenizer.ggml.eos_token_id"), field(reader, "tokenizer.ggml.eot_token_id")) == (2, 2)
    assert field(reader, "tokenizer.ggml.padding_token_id") == 3
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == (tiny_model_path / "chat_template.jinja").read_text()
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    expected = AutoModelForCausalLM.from_pretrained(tiny_model_path).model.embed_tokens.weight
    assert embedding.tensor_type == gguf.GGMLQuantizationType.F16
    assert np.array_equal(embedding.data, expected.detach().float().numpy().astype(np.float16))


@pytest.fixture
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def load(path):
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=1, n_threads_batch=1)


def gguf_logprobs(llm, ids) -> torch.Tensor:
    llm.reset()
    llm.eval(ids)
    return torch.from_numpy(llm.scores[: len(ids)].copy()).log_softmax(-1)


@pytest.mark.slow
def test_gguf_of_the_embedded_model_matches_transformers(llama_cpp, tiny_model_path, tmp_path):
    from ftune.export.gguf_parity import LOGPROB_TOLERANCE

    out = tmp_path / "gguf"
    assert main(["export", f"model={tiny_model_path}", "format=gguf", "quant=f16", f"out={out}"]) == 0
    report = json.loads((out / "export_report.json").read_text())
    assert all(check["passed"] for check in report["parity"]["checks"].values())
    llm = load(gguf_file(out))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    for ids in IDS:
        with torch.no_grad():
            expected = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        assert (gguf_logprobs(llm, ids) - expected).abs().max() <= LOGPROB_TOLERANCE["f16"]
    text = "<|im_start|>user\nIt's 33 degrees, isn't it?<|im_end|>\n"
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == AutoTokenizer.from_pretrained(
        tiny_model_path).encode(text)
    llm.close()


def test_a_wrong_conversion_fails_parity_and_writes_nothing(llama_cpp, tiny_model_path, tmp_path, capsys,
                                                            monkeypatch):
    import ftune.export.gguf_file

    # q_proj/k_proj rows left in transformers' order: the file loads and runs, but computes something else
    monkeypatch.setattr(ftune.export.gguf_file, "permute_for_rope", lambda name, tensor, config: tensor)
    out = tmp_path / "gguf"
    assert main(["export", f"model={tiny_model_path}", "format=gguf", f"out={out}"]) == 1
    err = capsys.readouterr().err
    assert "format=gguf failed its parity check against the trained model" in err and "next-token log-probs" in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_from_a_lora_run_computes_and_chats_as_the_trained_model(llama_cpp, lora_run, tiny_model_path, tmp_path,
                                                                      quant, conversation, training_render,
                                                                      monkeypatch):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from peft import PeftModel

    from ftune.export.gguf_parity import LOGPROB_TOLERANCE

    out = tmp_path / quant
    assert main(["export", f"run={lora_run}", "format=gguf", f"quant={quant}", f"out={out}"]) == 0
    llm = load(gguf_file(out))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    trained = PeftModel.from_pretrained(base, lora_run / "final").eval()
    for ids in IDS:
        with torch.no_grad():
            expected = trained(torch.tensor([ids])).logits[0].log_softmax(-1)
        assert (gguf_logprobs(llm, ids) - expected).abs().max() <= LOGPROB_TOLERANCE[quant]

    tokenizer = AutoTokenizer.from_pretrained(lora_run / "final")
    stop_ids = trained.generation_config.eos_token_id
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        with torch.no_grad():
            expected = trained.generate(input_ids=torch.tensor([ids]), do_sample=False, max_new_tokens=16,
                                        eos_token_id=stop_ids)[0, len(ids):].tolist()
        served = []
        for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
            served.append(token)
            if token in stop_ids or len(served) == 16:
                break
        if quant == "f16" or served == expected:
            assert served == expected, prompt
            continue
        # q8_0 may flip a near tie: where the continuations part, the trained model's preference for its own
        # token over llama.cpp's must lie within the quant's log-prob tolerance
        first = next(i for i, (a, b) in enumerate(zip(served, expected, strict=False)) if a != b)
        with torch.no_grad():
            logprobs = trained(torch.tensor([ids + expected[:first]])).logits[0, -1].log_softmax(-1)
        margin = (logprobs[expected[first]] - logprobs[served[first]]).item()
        assert 0 <= margin <= LOGPROB_TOLERANCE[quant], (prompt, margin)

    assert llm.chat_format == "chat_template.default"  # llama-cpp-python serves the file's template, not a guess
    eos, bos = (llm.detokenize([token], special=True).decode() for token in (llm.token_eos(), llm.token_bos()))
    formatter = Jinja2ChatFormatter(template=llm.metadata["tokenizer.chat_template"], eos_token=eos, bos_token=bos)
    prompt = conversation[:-1]  # two user turns, the second still to be answered
    trained_prompt = training_render(prompt, add_generation_prompt=True)
    assert formatter(messages=prompt).prompt == trained_prompt
    # and through the chat handler itself: the token ids it hands to the completion are training's
    completion, handed = llm.create_completion, []
    monkeypatch.setattr(llm, "create_completion", lambda prompt, **kwargs: handed.append(prompt) or completion(
        prompt=prompt, **kwargs))
    llm.create_chat_completion(messages=prompt, max_tokens=1, temperature=0.0)
    assert handed == [tokenizer.encode(trained_prompt, add_special_tokens=False)]
    llm.close()

    card = (out / "README.md").read_text()
    assert "library_name: gguf" in card and f"- {quant}" in card and "next-token KL divergence, mean" in card


def test_llama3_rope_factors_turn_the_default_frequencies_into_transformers_scaled_ones():
    """llama.cpp divides each rotary frequency by the file's `rope_freqs`; the result must be transformers' own."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from ftune.export.gguf_file import llama3_rope_factors

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=32, head_dim=64, rope_parameters=rope)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    default = 1.0 / 500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    factors = torch.from_numpy(llama3_rope_factors(config.to_dict()))
    assert factors.min() == 1.0 and factors.max() == 32.0  # short wavelengths kept, long ones divided by 32
    torch.testing.assert_close(default / factors, scaled.double(), rtol=1e-6, atol=0)
