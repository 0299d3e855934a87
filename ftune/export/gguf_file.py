"""Write a Hugging Face model directory (weights, config, tokenizer, chat template) as one GGUF file.

The `gguf` package (maintained in llama.cpp's repository) writes the container, names the tensors
(`TensorNameMap`), quantizes (`gguf.quants`) and reads merges, special tokens and the chat template
(`SpecialVocab`). What it leaves to llama.cpp's `convert_hf_to_gguf.py`, which is a script in that repository
and not an installable module, is the per-architecture mapping: which hyperparameters become which keys, the
Q/K row permutation of Llama-style attention, which tensors stay f32, and the token list with its types. Only
that mapping is written here, following `conversion/llama.py`, `qwen.py` and `base.py` of llama.cpp at commit
0c1e570 (the one llama-cpp-python 0.3.36 vendors), for the architectures listed in `ARCHITECTURES`.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, GenerationConfig

from ftune.config.architecture import sliding_layers
from ftune.errors import ConfigError

QUANT_TYPES = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}
"""`quant=` -> (the file's declared type, the encoding of its matrices)."""


@dataclass(frozen=True)
class Architecture:
    """How one transformers architecture maps onto a llama.cpp one."""

    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool
    """Reorder q_proj/k_proj rows from transformers' rotate-half RoPE layout to llama.cpp's interleaved one."""


ARCHITECTURES = {
    "LlamaForCausalLM": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "MistralForCausalLM": Architecture(gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN2, permute_qk=False),
    "Qwen3ForCausalLM": Architecture(gguf.MODEL_ARCH.QWEN3, permute_qk=False),
}
"""Architectures format=gguf converts (llama.cpp runs Mistral as `llama`); others are refused before loading.

Qwen2 and Qwen3 are Llama layers with q/k/v biases (Qwen2) or per-head q/k RMSNorm (Qwen3), which the tensor
name map covers; llama.cpp runs them with transformers' rotate-half RoPE (`conversion/qwen.py`), so their
rows stay in order.
"""

GPT2_PRE_TOKENIZER = {"type": "ByteLevel", "use_regex": True}
"""A byte-level BPE that splits words with GPT-2's regex: llama.cpp's pre-tokenizer "gpt-2" is the same regex."""
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
"""Qwen2's word split (single digits, case-blind contractions), then a byte-level BPE without GPT-2's regex:
llama.cpp's pre-tokenizer "qwen2" (transformers 5 builds it for every Qwen2/Qwen3 tokenizer it loads)."""
PRE_TOKENIZERS = {"gpt-2": GPT2_PRE_TOKENIZER, "qwen2": {
    "type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated"},
                                          {"type": "ByteLevel", "use_regex": False}]}}
"""llama.cpp's pre-tokenizer name -> the tokenizer.json `pre_tokenizer` keys that define it.

llama.cpp's converter recognises a tokenizer by hashing its ids for a probe text, which only works for the
published tokenizers it lists; ftune's own tokenizer (and any retrained one) is recognised by its definition.
"""
ROPE_TYPES = ("default", "linear", "llama3")
"""RoPE scalings converted: metadata alone (linear), or a `rope_freqs` tensor of per-frequency factors (llama3,
as `conversion/llama.py: generate_extra_tensors` writes it); yarn and longrope need keys not mapped here."""


def check_convertible(config: dict, tokenizer: dict) -> None:
    """Refuse, before any weights load, a model whose architecture, RoPE or tokenizer this converter cannot map.

    Args:
        config: the model's config.json.
        tokenizer: its tokenizer.json.

    Raises:
        ConfigError: naming what is unsupported and the way out (format=hf, then llama.cpp's own converter).
    """
    hf_arch = (config.get("architectures") or ["?"])[0]
    way_out = "export format=hf and convert it with llama.cpp's convert_hf_to_gguf.py"
    if hf_arch not in ARCHITECTURES:
        raise ConfigError(f"format=gguf: architecture {hf_arch} is not supported (supported: "
                          f"{', '.join(ARCHITECTURES)})", way_out)
    if sliding_layers(config):
        raise ConfigError("format=gguf: sliding-window attention is not mapped (llama.cpp's `llama` graph attends "
                          "to the whole context)", way_out)
    rope_type = rope_parameters(config).get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"format=gguf: RoPE type {rope_type!r} is not supported (supported: "
                          f"{', '.join(ROPE_TYPES)})", way_out)
    if tokenizer["model"].get("type") != "BPE" or pre_tokenizer_name(tokenizer) is None:
        pre = tokenizer.get("pre_tokenizer") or {}
        raise ConfigError("format=gguf: only byte-level BPE tokenizers with GPT-2's or Qwen2's pre-tokenizer are "
                          f"converted (this one: model {tokenizer['model'].get('type')}, pre-tokenizer "
                          f"{pre.get('type')})", way_out)


def pre_tokenizer_name(tokenizer: dict) -> str | None:
    """The llama.cpp pre-tokenizer (`PRE_TOKENIZERS`) whose definition tokenizer.json's `pre_tokenizer` has, if any."""
    return next((name for name, keys in PRE_TOKENIZERS.items()
                 if has_keys(tokenizer.get("pre_tokenizer") or {}, keys)), None)


def has_keys(found, expected) -> bool:
    """Whether `found` holds every key of `expected` with the same value, nested dicts and lists compared alike."""
    if isinstance(expected, dict):
        return isinstance(found, dict) and all(has_keys(found.get(key), value) for key, value in expected.items())
    if isinstance(expected, list):
        return isinstance(found, list) and len(found) == len(expected) and all(map(has_keys, found, expected))
    return found == expected


def write_gguf(model_dir: Path, path: Path, quant: str, name: str) -> None:
    """Convert the model in `model_dir` (saved by transformers, with its tokenizer) into the GGUF file `path`.

    Args:
        model_dir: a directory with config.json, safetensors weights, tokenizer.json and tokenizer_config.json.
        path: the file to write.
        quant: a key of `QUANT_TYPES`.
        name: the model's name in the file's metadata (`general.name`).

    Raises:
        ConfigError: what this converter cannot map (`check_convertible`), or a tensor without a GGUF name.
    """
    config = read_json(model_dir / "config.json")
    check_convertible(config, read_json(model_dir / "tokenizer.json"))
    arch = ARCHITECTURES[config["architectures"][0]]
    file_type, matrix_type = QUANT_TYPES[quant]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hyperparameters(writer, config)
    add_tokenizer(writer, model_dir, config["vocab_size"])
    tensor_names = gguf.get_tensor_name_map(arch.gguf_arch, config["num_hidden_layers"])
    for hf_name, tensor in read_tensors(model_dir):
        if arch.permute_qk:
            tensor = permute_for_rope(hf_name, tensor, config)
        gguf_name = tensor_names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConfigError(f"format=gguf: tensor {hf_name} has no GGUF name for {config['architectures'][0]}")
        data, data_type = encode(gguf_name, tensor.float().numpy(), matrix_type)
        writer.add_tensor(gguf_name, data, raw_dtype=data_type)
    if rope_parameters(config).get("rope_type") == "llama3":
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(config))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_json(path: Path) -> dict:
    """A JSON file of the model directory."""
    return json.loads(path.read_text(encoding="utf-8"))


def rope_parameters(config: dict) -> dict:
    """RoPE settings as transformers 5 saves them (`rope_parameters`), or as older configs did (top level)."""
    return config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0),
                                             **(config.get("rope_scaling") or {})}


def llama3_rope_factors(config: dict) -> np.ndarray:
    """Llama 3.1's per-frequency RoPE scaling as llama.cpp reads it: the divisor of each rotary frequency.

    transformers scales the frequencies when it builds the rotary embedding (`_compute_llama3_parameters`);
    llama.cpp divides by these factors instead, so the file carries them (`conversion/llama.py`): 1 for short
    wavelengths, `factor` for long ones, a smooth blend between.
    """
    rope = rope_parameters(config)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    context = rope.get("original_max_position_embeddings", 8192)
    wavelengths = 2 * np.pi * rope.get("rope_theta", 10000.0) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    smooth = (context / wavelengths - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelengths < context / high, 1.0, np.where(wavelengths > context / low, factor, blended)).astype(
        np.float32)


def add_hyperparameters(writer: gguf.GGUFWriter, config: dict) -> None:
    """The `<arch>.*` keys llama.cpp reads to build the graph (`conversion/base.py: set_gguf_parameters`)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rope = rope_parameters(config)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int) -> None:
    """Token list and types, merges, special ids, whether BOS is prepended, and the chat template.

    `SpecialVocab` reads merges, EOS/PAD and chat_template.jinja; the token types and the end-of-turn id come
    from the tokenizer and the generation config, so llama.cpp parses `<|im_end|>` in text as one control
    token and stops generating at it, as transformers does.
    """
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens, types = token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(read_json(model_dir / "tokenizer.json")))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
    special.add_to_gguf(writer, quiet=True)
    writer.add_add_bos_token(adds_bos(tokenizer))
    if (model_dir / "generation_config.json").is_file():
        end_of_turn = generation_stop_ids(GenerationConfig.from_pretrained(model_dir))
        if end_of_turn:
            writer.add_eot_token_id(end_of_turn[0])


def token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id's byte-level token text and its type (`conversion/base.py: get_vocab_base`).

    Special added tokens are CONTROL (parsed whole, never printed), other added tokens USER_DEFINED, ids the
    tokenizer does not use (an embedding padded to a multiple) UNUSED placeholders.
    """
    by_id = {index: text for text, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in added:
            tokens.append(added[index].content)
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[index])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def adds_bos(tokenizer) -> bool:
    """Whether encoding text prepends BOS (llama.cpp must do the same, or every position shifts)."""
    ids = tokenizer.encode("a")
    return tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]


def generation_stop_ids(generation_config) -> list[int]:
    """The ids generation stops at, as a list: ftune puts the template's end-of-turn token first, then EOS."""
    ids = generation_config.eos_token_id
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


def read_tensors(model_dir: Path):
    """(name, tensor) for every tensor of every safetensors file of `model_dir` (sharded or not)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"format=gguf: no safetensors weights in {model_dir}")
    for file in files:
        with safe_open(file, framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, weights.get_tensor(name)


def permute_for_rope(name: str, tensor: torch.Tensor, config: dict) -> torch.Tensor:
    """q_proj/k_proj rows reordered from rotate-half pairs (i, i + d/2) to adjacent pairs (2i, 2i + 1).

    transformers' Llama applies RoPE to the two halves of each head; llama.cpp's `llama` graph rotates
    neighbouring entries, so the converter permutes the rows (`conversion/llama.py: LlamaModel.permute`).
    """
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        heads = config["num_attention_heads"]
    elif name.endswith(("k_proj.weight", "k_proj.bias")):
        heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    else:
        return tensor
    return (tensor.reshape(heads, 2, tensor.shape[0] // heads // 2, *tensor.shape[1:])
            .swapaxes(1, 2).reshape(tensor.shape))


def encode(gguf_name: str, data: np.ndarray, matrix_type: gguf.GGMLQuantizationType):
    """The tensor in the file's encoding: vectors and norms stay f32 (llama.cpp's kernels expect it).

    Q8_0 packs rows in blocks of 32; a matrix whose rows are not a multiple of that is written f16 instead, as
    llama.cpp's converter does (the tiny model's 688-wide MLP rows are).

    Returns:
        (the encoded array, its GGML type).
    """
    data_type = matrix_type
    if data.ndim <= 1 or gguf_name.endswith("_norm.weight"):
        data_type = gguf.GGMLQuantizationType.F32
    try:
        return gguf.quants.quantize(data, data_type), data_type
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16
