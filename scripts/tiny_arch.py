"""Tiny random-weight models of real architectures, built from the official config.json files ftune ships.

An architecture's quirks live in its config and modelling code, not in its weights, so each family of
`model_families.yaml` is rebuilt here at a few hundred thousand parameters with every feature its config turns
on (attention variant, soft-capping, sliding-window pattern, tied embeddings, QK-norm, fused projections, MoE
routing, rope scaling type) and a byte-level BPE tokenizer whose special tokens, pad token (or its absence)
and embedding padding follow the family's real tokenizer:
    python scripts/tiny_arch.py --out /tmp/tiny-archs            # every family, a few seconds
    python scripts/tiny_arch.py --out /tmp/tiny-archs qwen3-8b   # one
The models are not shipped: tests build them in a session fixture (tests/model/conftest.py).
"""

import argparse
import json
from pathlib import Path

import torch
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
HUB = REPO / "ftune" / "configs" / "hub"
TEMPLATES = REPO / "ftune" / "assets" / "chat_templates"
FAMILIES_FILE = Path(__file__).with_name("model_families.yaml")
CORPUS = REPO / "ftune" / "assets" / "data" / "chat" / "train.jsonl"
BASE_VOCAB = 320
"""Byte-level BPE size before special tokens: 256 bytes + 64 merges; real families have 32k-262k."""
HIDDEN, HEADS, HEAD_DIM, INTERMEDIATE = 64, 4, 16, 96
EXPERTS, EXPERTS_PER_TOKEN, EXPERT_INTERMEDIATE = 4, 2, 32
SLIDING_WINDOW = 8
"""Shorter than the packed rows the tests build (so sliding layers really slide inside a row)."""
DENSE_LAYERS = 2
SEED = 0


def families() -> dict[str, dict]:
    """The family table (`model_families.yaml`): family name -> hub id and tokenizer facts."""
    return yaml.safe_load(FAMILIES_FILE.read_text())


def official_config(hub_id: str) -> dict:
    """The shipped config.json of `hub_id` (ftune/configs/hub/<org>/<name>/config.json), as a dict."""
    return json.loads((HUB / hub_id / "config.json").read_text())


def layer_count(config: dict) -> int:
    """Enough layers to keep the family's attention pattern: Gemma 3's five sliding layers then a global one."""
    return config.get("sliding_window_pattern") or DENSE_LAYERS


def scale_config(config: dict, vocab_rows: int, ids: dict[str, int | None]) -> dict:
    """The official config shrunk to tiny sizes, every feature switch kept as it is.

    Sizes shrink (hidden, heads, layers, experts, vocabulary); what selects behaviour is kept: soft-capping,
    rope scaling type, tied embeddings, QK-norm (implied by model_type), MoE routing (top-k, normalisation,
    aux-loss coefficient), the sliding window (shortened to `SLIDING_WINDOW`, so it is shorter than a packed
    row) and its layer pattern. Key/value heads keep their relation to query heads (equal, grouped, or one).
    """
    tiny = {k: v for k, v in config.items() if k not in ("layer_types", "_name_or_path", "auto_map", "torch_dtype")}
    kv = config.get("num_key_value_heads", config["num_attention_heads"])
    tiny |= {
        "hidden_size": HIDDEN, "num_attention_heads": HEADS, "intermediate_size": INTERMEDIATE,
        "num_key_value_heads": HEADS if kv == config["num_attention_heads"] else (1 if kv == 1 else 2),
        "num_hidden_layers": layer_count(config), "vocab_size": vocab_rows, "dtype": "float32",
    }
    if "head_dim" in config:
        tiny["head_dim"] = HEAD_DIM
    if "query_pre_attn_scalar" in config:  # Gemma scales queries by this instead of head_dim
        tiny["query_pre_attn_scalar"] = HEAD_DIM
    if "max_window_layers" in config:  # Qwen: layers from this index on would slide (when enabled)
        tiny["max_window_layers"] = min(config["max_window_layers"], tiny["num_hidden_layers"])
    if config.get("sliding_window") is not None and config.get("use_sliding_window", True):
        tiny["sliding_window"] = SLIDING_WINDOW
    for key in ("num_experts", "num_local_experts"):
        if key in config:
            tiny[key] = EXPERTS
    if "num_experts_per_tok" in config:
        tiny["num_experts_per_tok"] = EXPERTS_PER_TOKEN
    if "moe_intermediate_size" in config:
        tiny["moe_intermediate_size"] = EXPERT_INTERMEDIATE
    scaling = config.get("rope_scaling") or {}
    if isinstance(scaling.get("long_factor"), list):  # LongRoPE (Phi-3.5): one factor per rotary frequency
        rotary_half = tiny.get("head_dim", HIDDEN // HEADS) // 2
        tiny["rope_scaling"] = scaling | {key: resample(scaling[key], rotary_half)
                                          for key in ("long_factor", "short_factor")}
    for role in ("bos", "eos", "pad"):
        key = f"{role}_token_id"
        if key in config or ids.get(role) is not None:
            tiny[key] = ids.get(role)
    return tiny


def resample(factors: list[float], size: int) -> list[float]:
    """`size` evenly spaced entries of a per-frequency list, first and last kept: [1, 2, 3, 4, 5], 3 -> [1, 3, 5]."""
    return [factors[round(i * (len(factors) - 1) / max(size - 1, 1))] for i in range(size)]


def base_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on ftune's shipped chat data: no unknown token, like Llama 3, Qwen and Mistral."""
    texts = [m["content"] for line in CORPUS.read_text().splitlines() for m in json.loads(line)["messages"]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BASE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def family_tokenizer(family: dict, base: Tokenizer) -> PreTrainedTokenizerFast:
    """The base BPE plus the family's special tokens, in the roles its real tokenizer gives them."""
    roles = {f"{role}_token": family.get(role) for role in ("bos", "eos", "pad", "unk") if family.get(role)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(base.to_str()), **roles)
    tokenizer.add_special_tokens({"additional_special_tokens": list(family["specials"])})
    tokenizer.chat_template = (TEMPLATES / f"{family['template']}.jinja").read_text()
    return tokenizer


def build(name: str, out: Path, base: Tokenizer | None = None, seed: int = SEED) -> Path:
    """Build family `name` into `out/name` (config.json, model.safetensors, tokenizer) and return that path."""
    family = families()[name]
    tokenizer = family_tokenizer(family, base or base_tokenizer())
    ids = {role: tokenizer.convert_tokens_to_ids(family[role]) if family.get(role) else None
           for role in ("bos", "eos", "pad")}
    official = official_config(family["hub"])
    config = AutoConfig.for_model(**scale_config(official, len(tokenizer) + family["extra_rows"], ids))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = out / name
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "tiny_arch.json").write_text(json.dumps({"family": name, "hub": family["hub"],
                                                     "template": family["template"]}, indent=2) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("names", nargs="*", help="families to build (default: all)")
    args = parser.parse_args()
    base = base_tokenizer()
    for name in args.names or families():
        path = build(name, args.out, base)
        params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())
        print(f"{name}: {params:,} parameters -> {path}")


if __name__ == "__main__":
    main()
