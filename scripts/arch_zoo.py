"""Every decoder-only causal LM transformers registers, as a tiny random model built from its config class's defaults.

The families of `model_families.yaml` are official configs with real tokenizer facts (scripts/tiny_arch.py); the
zoo is the long tail: each architecture of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` that is a decoder on its own,
its config class's defaults shrunk (`shrink`) with every feature switch kept, and one shared byte-level BPE with
ChatML tokens and template, so `ftune train recipe=tiny_lora` runs on any of them:
    python scripts/arch_zoo.py --out /tmp/zoo                  # every architecture
    python scripts/arch_zoo.py --out /tmp/zoo olmo2 smollm3    # some (model_type names)
    python scripts/arch_zoo.py --skipped                        # what is left out, and why
"""

import argparse
import inspect
import json
import re
from functools import cache
from pathlib import Path

import tiny_arch
import torch
import transformers
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

HIDDEN, HEADS, HEAD_DIM, INTERMEDIATE = tiny_arch.HIDDEN, tiny_arch.HEADS, tiny_arch.HEAD_DIM, 128
EXPERTS, EXPERTS_PER_TOKEN, EXPERT_INTERMEDIATE = tiny_arch.EXPERTS, tiny_arch.EXPERTS_PER_TOKEN, 32
MAX_PARAMETERS = 2_000_000
"""A tiny model above this kept a size the generic shrinking missed: refused rather than built slowly."""
MAX_LAYERS = 8
"""Most layers kept to reach every layer type of a config's pattern (Jamba: attention in 1 layer of 8)."""
TOKENS = {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "bos": "<|endoftext|>",
          "eos": "<|im_end|>", "pad": "<|endoftext|>", "template": "chatml"}
"""The zoo's tokenizer facts, in tiny_arch's family format: ChatML, as most recent open models use."""

SIZES = (
    (HIDDEN, ("hidden_size", "d_model", "n_embd", "n_embed", "embed_dim", "dim", "hidden_dim", "model_dim")),
    (INTERMEDIATE, ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "ffn_hidden_size", "mlp_dim", "d_inner",
                    "inner_dim")),
    (HEADS, ("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads")),
    (HEAD_DIM, ("head_dim", "attention_head_dim", "kv_channels", "qk_nope_head_dim", "v_head_dim", "d_head")),
    (HEAD_DIM // 2, ("qk_rope_head_dim", "rotary_dim")),  # partial rotary (CodeGen, GPT-J) stays partial
    (32, ("kv_lora_rank", "q_lora_rank", "index_head_dim", "index_topk")),
    (EXPERTS, ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")),
    (EXPERTS_PER_TOKEN, ("num_experts_per_tok", "moe_topk", "moe_k", "top_k", "num_selected_experts",
                         "num_experts_per_token", "n_group")),
    (EXPERT_INTERMEDIATE, ("moe_intermediate_size", "expert_intermediate_size", "shared_expert_intermediate_size",
                           "moe_ffn_hidden_size", "ffn_hidden_size_moe")),
    (1, ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts", "first_k_dense_replace", "topk_group")),
    (tiny_arch.SLIDING_WINDOW, ("sliding_window",)),
)
SIZE_OF = {name: size for size, names in SIZES for name in names}
"""Config field (by its names across transformers' configs) -> its tiny value."""
SIZE_PATTERNS = (
    (r"(expert|moe).*(intermediate|ffn|hidden)|(intermediate|ffn).*expert", EXPERT_INTERMEDIATE),
    (r"head_dim|dim_head", HEAD_DIM),
    (r"lora_rank", 32),
    (r"intermediate|ffn|^dff$|dim_ff", INTERMEDIATE),
    (r"window", tiny_arch.SLIDING_WINDOW),
    (r"state_size|d_state", 16),
    (r"num_heads$", HEADS),
    (r"hidden_size|^(emb_dim|embedding_dim|lru_width)$", HIDDEN),
)
"""(regex, tiny value) for size fields `SIZE_OF` does not name, tried in order: `linear_key_head_dim`,
`shared_experts_intermediate_size`, `o_lora_rank`, `attention_window_size`, `ssm_state_size`..."""
KV_HEAD_FIELDS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "n_head_kv")
LAYER_FIELDS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
QUIRKS = ("sliding pattern", "all-sliding", "soft-capping", "MoE fused experts", "QK-norm", "tied embeddings",
          "parallel attention/MLP", "fused qkv", "MLA", "ALiBi", "no rope", "recurrent / linear-attention layers")
"""What `detect_features` finds: the quirks ftune's loading, masks, adapters, plan and export must each handle.

No mixture-of-experts causal LM of transformers 5.25 keeps one Linear per expert: all fuse them in 3D weights."""
MAMBA_HEADS = {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16}
"""Mamba-2 heads of hybrid models: 8 x 16 = expand (2) x hidden (64), as their configs require."""
OVERRIDES: dict[str, dict] = {
    "bamba": MAMBA_HEADS, "granitemoehybrid": MAMBA_HEADS, "mamba2": {"num_heads": 8, "head_dim": 16},
    "zaya": {"num_experts_per_tok": 1},  # its router supports top-1 only
    "gemma4_assistant": {"hidden_size_per_layer_input": 0},  # the assistant has no per-layer inputs
    "kolibri1_1": {"index_num_heads": 2},
    "dory": {"num_hidden_layers": 3, "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1},
}
"""model_type -> config fields the generic shrinking cannot derive (relations between sizes it does not know)."""


def causal_lm_classes() -> dict[str, str]:
    """model_type -> causal-LM class name, one model_type per class (aliases dropped: same modelling code).

    Of a class's model_types, the one its own config class names is kept (`llama4_text`, not `llama4`; `gpt2`,
    not `gpt-sw3`), else the first.
    """
    by_class: dict[str, list[str]] = {}
    for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items():
        by_class.setdefault(class_name, []).append(model_type)
    chosen = {}
    for class_name, types in by_class.items():
        own = model_class(class_name).config_class
        chosen[next((t for t in types if t == own.model_type), types[0])] = class_name
    return dict(sorted(chosen.items()))


def model_class(class_name: str) -> type:
    return getattr(transformers, class_name)


def aliases() -> dict[str, list[str]]:
    """Kept model_type -> the other model_types registered with the same causal-LM class."""
    kept = causal_lm_classes()
    return {kept_type: [t for t, c in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items() if c == name and t != kept_type]
            for kept_type, name in kept.items()}


def own_config_class(model_type: str) -> type[PretrainedConfig]:
    """The config class the causal-LM class of `model_type` is built from (a text config for some multimodal ones)."""
    return model_class(causal_lm_classes()[model_type]).config_class


@cache
def skip_reason(model_type: str) -> str | None:
    """Why `model_type` is not a decoder-only model the zoo builds, or None when it is (detected, not listed)."""
    class_name, config_class = causal_lm_classes()[model_type], own_config_class(model_type)
    if getattr(config_class, "is_encoder_decoder", False):  # the field's default
        return f"encoder-decoder: {class_name} is the decoder half, trained with an encoder"
    towers = [key for key in getattr(config_class, "sub_configs", {}) if any(
        modality in key for modality in ("vision", "audio", "vq", "image", "speech"))]
    if towers:
        return f"multimodal: {class_name} takes {config_class.__name__} with {', '.join(towers)}, not a text config"
    if config_class.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"multimodal: {class_name}'s {config_class.__name__} is not registered for AutoModelForCausalLM"
    if re.search(r"(is_causal=|self\.is_decoder = )config\.is_decoder", source(inspect.getmodule(model_class(
            class_name)))):
        return f"bidirectional encoder: {class_name} is causal only with is_decoder=True (BERT-style)"
    return None


def source(obj) -> str:
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def architectures() -> list[str]:
    """The model_types the zoo builds: every deduplicated causal LM that is not skipped."""
    return [t for t in causal_lm_classes() if skip_reason(t) is None]


def layer_pattern_length(fields: dict, layers: int) -> int:
    """Layers enough to hold every distinct entry of each per-layer list or string of `fields` (at least 2)."""
    needed = tiny_arch.DENSE_LAYERS
    for value in fields.values():
        if isinstance(value, list | str) and len(value) == layers and len(set(map(str, value))) > 1:
            entries = list(map(str, value))
            needed = max(needed, max(entries.index(entry) for entry in set(entries)) + 1)
    return min(needed, MAX_LAYERS)


def shrink(fields: dict, vocab: int, ids: dict[str, int]) -> dict:
    """A config's fields (`to_dict()`) at tiny sizes, every feature switch kept; nested sub-configs too.

    Named sizes take `SIZE_OF`'s values (hidden 64, 4 heads of 16, experts 4 top-2, a window of 8), key/value
    heads keep their relation to query heads (equal, one, or grouped), and per-layer lists and strings are cut
    to the layers kept (enough for every layer type). Switches (soft-capping, QK-norm, tied embeddings, rope
    type, routing normalisation) are not sizes and stay as the defaults set them.
    """
    layers = next((fields[key] for key in LAYER_FIELDS if isinstance(fields.get(key), int)), None)
    kept = layer_pattern_length(fields, layers) if layers else None
    tiny = {}
    for key, value in fields.items():
        if value is None and key in ("head_dim", *KV_HEAD_FIELDS):  # None: derived, which some classes forget
            value = HEAD_DIM if key == "head_dim" else fields.get("num_attention_heads")
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            tiny[key] = tiny_int(key, value, fields, kept, vocab)
        elif layers and isinstance(value, list | str) and len(value) == layers and key != "model_type":
            tiny[key] = value[:kept]
        elif isinstance(value, dict) and SIZE_OF.keys() & value.keys():  # a sub-config (DBRX's ffn_config, BLT's)
            tiny[key] = value | shrink(value, vocab, ids)
    tiny |= {"vocab_size": vocab} if "vocab_size" in fields else {}
    tiny |= {f"{role}_token_id": ids[role] for role in ("bos", "eos", "pad") if f"{role}_token_id" in fields}
    return tiny | rope_fields(fields)


def tiny_int(key: str, value: int, fields: dict, layers: int | None, vocab: int) -> int:
    """The tiny value of the int field `key` (its default: `value`), or `value` when it is not a size."""
    if key in LAYER_FIELDS:
        return layers
    if key in KV_HEAD_FIELDS:
        heads = next((fields[k] for k in SIZES[2][1] if isinstance(fields.get(k), int)), value)
        return HEADS if value == heads else (1 if value == 1 else 2)
    if "vocab" in key and value > vocab:  # vocab_size, unpadded_vocab_size, vocab_size_per_layer_input
        return vocab
    size = SIZE_OF.get(key) or next((size for pattern, size in SIZE_PATTERNS if re.search(pattern, key)), None)
    if size is None or value <= 0:
        return value
    return min(size, value) if "window" in key else size


def rope_fields(fields: dict) -> dict:
    """Per-frequency rope lists (LongRoPE factors, M-RoPE sections) resized to the tiny rotary dimension."""
    rope = fields.get("rope_parameters") or fields.get("rope_scaling")
    if not isinstance(rope, dict):
        return {}
    key = "rope_parameters" if fields.get("rope_parameters") else "rope_scaling"
    rotary_half = int(HEAD_DIM * rope.get("partial_rotary_factor", fields.get("partial_rotary_factor", 1.0))) // 2
    resized = dict(rope)
    for name in ("long_factor", "short_factor"):
        if isinstance(rope.get(name), list):
            resized[name] = tiny_arch.resample(rope[name], rotary_half)
    if isinstance(rope.get("mrope_section"), list):
        sections = rope["mrope_section"]
        resized["mrope_section"] = [rotary_half - (len(sections) - 1) * (rotary_half // len(sections))] + \
            [rotary_half // len(sections)] * (len(sections) - 1)
    return {key: resized}


def tiny_config(model_type: str, vocab: int, ids: dict[str, int]) -> PretrainedConfig:
    """`model_type`'s config class at its defaults, shrunk, then `OVERRIDES` applied."""
    config_class, overrides = own_config_class(model_type), OVERRIDES.get(model_type, {})
    try:
        defaults = config_class()
    except ValueError:  # defaults that do not validate on their own (Gemma 4's assistant)
        defaults = config_class(**overrides)
    fields = shrink(defaults.to_dict(), vocab, ids) | {"vocab_size": vocab, "dtype": "float32"}
    return config_class(**(fields | latent_attention_dims(fields) | overrides))


def latent_attention_dims(fields: dict) -> dict:
    """MLA's derived head sizes, kept consistent with the shrunk ones (DeepSeek's config derives them once).

    A query/key head is its position-free part and its rotary part (`qk_head_dim`), and rotary embeddings are
    built for the rotary part only (`head_dim`); shrinking each field alone left 16 against 16 + 8.
    """
    if "qk_nope_head_dim" not in fields or "qk_rope_head_dim" not in fields:
        return {}
    derived = {"qk_head_dim": fields["qk_nope_head_dim"] + fields["qk_rope_head_dim"],
               "head_dim": fields["qk_rope_head_dim"]}
    return {key: value for key, value in derived.items() if key in fields}


def token_facts(tokenizer) -> tuple[int, dict[str, int]]:
    """(vocabulary size, {"bos"/"eos"/"pad": token id}) of the zoo's tokenizer, as the config takes them."""
    return len(tokenizer), {role: tokenizer.convert_tokens_to_ids(TOKENS[role]) for role in ("bos", "eos", "pad")}


def build(model_type: str, out: Path, base: Tokenizer | None = None, seed: int = tiny_arch.SEED) -> Path:
    """Build `model_type` into `out/model_type` (config, weights, tokenizer with chat template); return the path."""
    tokenizer = tiny_arch.family_tokenizer(TOKENS, base or tiny_arch.base_tokenizer())
    config = tiny_config(model_type, *token_facts(tokenizer))
    with torch.device("meta"):
        parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if parameters > MAX_PARAMETERS:
        raise ValueError(f"not shrunk: {parameters:,} parameters (a size field arch_zoo.SIZES does not name)")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = out / model_type
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "tiny_arch.json").write_text(json.dumps({"architecture": model_type, "template": "chatml"}) + "\n")
    return path


def detect_features(model: torch.nn.Module) -> list[str]:
    """The `QUIRKS` of `model`, read off its config and module names (the matrix lists them, tests pick by them)."""
    from ftune.model.adapters import expert_parameters

    config, names = model.config, [name for name, _ in model.named_modules()]
    fields = config.to_dict()
    types = set(getattr(config, "layer_types", None) or [])
    alibi = uses_alibi(fields, inspect.getmodule(type(model)))
    output = model.get_output_embeddings()
    found = {
        "sliding pattern": "sliding_attention" in types and len(types) > 1,
        "all-sliding": bool(fields.get("sliding_window")) and fields.get("use_sliding_window") is not False
        and types <= {"sliding_attention"},
        "soft-capping": any("softcap" in key and value for key, value in fields.items()),
        "MoE fused experts": bool(expert_parameters(model)),
        "QK-norm": any(name.endswith(("q_norm", "k_norm", "q_layernorm", "k_layernorm")) for name in names),
        "tied embeddings": output is not None and output.weight is model.get_input_embeddings().weight,
        "parallel attention/MLP": any("parallel" in key and value is True for key, value in fields.items()),
        "fused qkv": any(name.endswith(("qkv_proj", "query_key_value", "c_attn", "Wqkv", "qkv")) for name in names),
        "MLA": bool(fields.get("kv_lora_rank")),
        "ALiBi": alibi,
        "no rope": not alibi and not any("rotary" in name or "rope" in name for name in names),
        "recurrent / linear-attention layers": bool(types - {"sliding_attention", "full_attention", "attention"})
        or any("mamba" in name for name in names),
    }
    return [quirk for quirk in QUIRKS if found[quirk]]


def uses_alibi(fields: dict, module) -> bool:
    """ALiBi: switched on in the config (MPT's `attn_config`), or built by modelling code that has no switch (BLOOM)."""
    switches = [value for key, value in fields.items() if "alibi" in key] + [
        value for sub in fields.values() if isinstance(sub, dict) for key, value in sub.items() if "alibi" in str(key)]
    return any(switches) or (not switches and "build_alibi_tensor" in source(module))


def tiny_meta_model(model_type: str, tokenizer) -> torch.nn.Module:
    """`model_type`'s tiny model on the meta device (no memory, no init): for feature detection."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_config(model_type, *token_facts(tokenizer)))


def representatives(base: Tokenizer | None = None) -> dict[str, str]:
    """Quirk -> the zoo architecture that stands for it in the models-marked tests.

    Of the architectures that build and have the quirk, the one with the fewest other quirks (then the first by
    name), so a failure points at the quirk rather than at a combination.
    """
    tokenizer, found = tiny_arch.family_tokenizer(TOKENS, base or tiny_arch.base_tokenizer()), {}
    for model_type in architectures():
        try:
            found[model_type] = detect_features(tiny_meta_model(model_type, tokenizer))
        except Exception:  # an architecture that does not build represents nothing
            continue
    return {quirk: min((t for t in found if quirk in found[t]), key=lambda t: (len(found[t]), t))
            for quirk in QUIRKS if any(quirk in features for features in found.values())}


def main() -> None:
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--skipped", action="store_true", help="list the causal LMs left out, and why")
    parser.add_argument("names", nargs="*", help="model_types to build (default: all)")
    args = parser.parse_args()
    if args.skipped:
        for model_type in causal_lm_classes():
            if reason := skip_reason(model_type):
                print(f"{model_type}: {reason}")
        return
    base = tiny_arch.base_tokenizer()
    for name in args.names or architectures():
        try:
            path = build(name, args.out, base)
        except Exception as err:  # the zoo reports every architecture that does not build
            print(f"{name}: FAILED {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
        print(f"{name}: {params:,} parameters -> {path}")


if __name__ == "__main__":
    main()
