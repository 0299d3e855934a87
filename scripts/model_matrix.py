"""The model matrix: measure ftune's promises on tiny copies of today's architectures, write results/models.md.

    python scripts/model_matrix.py                       # every family, ~2 minutes on 2 CPU cores
    python scripts/model_matrix.py --out /tmp/models.md qwen3-8b

Each family is built by scripts/tiny_arch.py from its shipped official config.json. The measurements here are
the ones tests/model/test_families.py asserts (pytest -m models): the loss before and after a few steps of
LoRA (all-linear), full fine-tuning and QLoRA; |packed - unpacked| / unpacked loss on every CPU attention
kernel the family allows, with documents longer than the sliding window; |merged - adapter| logits relative to
the largest logit; whether `ftune plan`'s parameter counts equal the instantiated model's.
"""

import argparse
import tempfile
import time
from pathlib import Path

import tiny_arch
import torch
import torch.nn.functional as F

from ftune.config.architecture import NO_SDPA, is_mixture_of_experts, sliding_layers
from ftune.config.compose import load_run_config
from ftune.data.collate import PackedCollator
from ftune.data.mask import IGNORE_INDEX
from ftune.data.packing import pack
from ftune.model.load import count_parameters, load_base_model, load_tokenizer, prepare_model
from ftune.model.meta import build_meta_model

REPO = Path(__file__).resolve().parents[1]
TEXTS = ("Leo has sold the new cup, and he is drinking the milk now.",
         "Put this in the present perfect: Jack drank the milk.",
         "Answer with the sentence only.")
"""Three documents, two longer than the tiny models' sliding window."""
METHODS = {"lora": (["method.name=lora"], 1e-2), "full": (["method.name=full"], 1e-3),
           "qlora": (["method.name=lora", "quant.bits=4", "quant.compute_dtype=fp32"], 1e-2)}
"""Method -> (overrides, learning rate of the few-step check)."""
STEPS = 8
QK_NORM = ("qwen3", "qwen3_moe", "olmo2")


def official(family: str) -> dict:
    """The shipped official config.json the family's tiny model is built from."""
    return tiny_arch.official_config(tiny_arch.families()[family]["hub"])


def attention_kernels(family: str) -> list[str]:
    """The CPU attention implementations the family allows (Gemma 2: eager only, for its soft-capping)."""
    return ["eager"] if official(family)["model_type"] in NO_SDPA else ["eager", "sdpa"]


def run_cfg(path: Path, family: str, *overrides: str):
    """A validated run config for the tiny model at `path` (no LoRA dropout: MoE experts refuse it)."""
    return load_run_config([f"model.name_or_path={path}", f"model.attn_implementation={attention_kernels(family)[-1]}",
                            "lora.dropout=0", *overrides])[0]


def token_batch(tokenizer) -> torch.Tensor:
    """`TEXTS` as one batch of equal-length rows (cut to the shortest)."""
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    width = min(map(len, ids))
    return torch.tensor([row[:width] for row in ids])


def mean_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def training_losses(path: Path, family: str, method: str) -> list[float]:
    """The loss at each of `STEPS` AdamW steps of `method` on one fixed batch, through ftune's prepare_model."""
    overrides, lr = METHODS[method]
    cfg = run_cfg(path, family, *overrides)
    torch.manual_seed(0)
    model = prepare_model(cfg)
    ids = token_batch(load_tokenizer(cfg.model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(STEPS):
        loss = mean_loss(model, ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def documents(tokenizer) -> list[dict]:
    """`TEXTS` as documents learned in full."""
    return [{"input_ids": row, "labels": list(row)}
            for row in (tokenizer.encode(text, add_special_tokens=False) for text in TEXTS)]


def loss_sum(model, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs).logits.float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def packed_and_unpacked(model, tokenizer, attn: str) -> tuple[float, float]:
    """Summed loss of `TEXTS` packed into one row (ftune's collator) and run one by one."""
    docs = documents(tokenizer)
    with torch.no_grad():
        alone = sum(loss_sum(model, {"input_ids": torch.tensor([d["input_ids"]])}, torch.tensor([d["labels"]]))
                    for d in docs)
        (row,) = pack(docs, max_length=sum(len(d["input_ids"]) for d in docs))  # all of them in one row
        batch = PackedCollator(tokenizer.pad_token_id, attn, pad_to_multiple_of=8)([row])
        packed = loss_sum(model, {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")},
                          batch["labels"])
    return packed.item(), alone.item()


def packed_gap(path: Path, family: str, attn: str) -> float:
    """|packed - unpacked| / unpacked loss with ftune's loading (sliding windows narrowed) and `attn`."""
    cfg = run_cfg(path, family, f"model.attn_implementation={attn}")
    packed, alone = packed_and_unpacked(load_base_model(cfg.model).eval(), load_tokenizer(cfg.model), attn)
    return abs(packed - alone) / alone


def unnarrowed_gap(path: Path, family: str) -> float:
    """The packed/unpacked gap of eager attention if the block mask reached sliding layers as it is."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    packed, alone = packed_and_unpacked(plain, load_tokenizer(run_cfg(path, family).model), "eager")
    return abs(packed - alone) / alone


def router_aux_loss(path: Path, family: str) -> float:
    """The router's balancing loss ftune adds (before its coefficient) on one batch of the LoRA model."""
    from ftune.model.moe import add_router_loss

    cfg = run_cfg(path, family)
    model = prepare_model(cfg)
    ids = token_batch(load_tokenizer(cfg.model))
    with torch.no_grad():
        model(input_ids=ids)
        parts = add_router_loss(model, {"labels": ids}, {"loss": torch.tensor(0.0)}, torch.tensor(1))
    return parts["router_loss"].item()


def merge_gap(path: Path, family: str) -> float:
    """|merged - adapter| logits over the largest logit, for a LoRA whose B matrices are non-zero."""
    cfg = run_cfg(path, family)
    torch.manual_seed(0)
    model = prepare_model(cfg).eval()
    ids = token_batch(load_tokenizer(cfg.model))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a trained-looking adapter: zero B would merge to nothing
        adapter = model(input_ids=ids).logits
        merged = model.merge_and_unload()(input_ids=ids).logits
    return ((merged - adapter).abs().max() / adapter.abs().max()).item()


def plan_and_model_counts(path: Path, family: str, method: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(total, trainable) as `ftune plan` counts them on the meta device, and on the instantiated model."""
    cfg = run_cfg(path, family, f"method.name={method}")
    return count_parameters(build_meta_model(cfg)[0]), count_parameters(prepare_model(cfg))


def expert_lora_parameters(path: Path, family: str) -> int:
    """Trainable LoRA parameters on the fused MoE expert weights under all-linear."""
    model = prepare_model(run_cfg(path, family))
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and ".experts." in name)


def features(family: str) -> str:
    """The architectural features of the family's official config, as the report lists them."""
    config, facts = official(family), tiny_arch.families()[family]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    found = ["MHA" if kv == heads else ("MQA" if kv == 1 else f"GQA {heads}/{kv}")]
    if sliding_layers(config):
        pattern = config.get("sliding_window_pattern")
        found.append(f"sliding window {config['sliding_window']}" + (f", 1 global in {pattern}" if pattern else ""))
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if config.get(key):
            found.append(f"{key.split('_')[0]} soft-cap {config[key]}")
    if config.get("tie_word_embeddings", True):
        found.append("tied embeddings")
    if config["model_type"] in QK_NORM:
        found.append("QK-norm")
    if config["model_type"] == "phi3":
        found.append("fused qkv_proj/gate_up_proj")
    if is_mixture_of_experts(config):
        experts = config.get("num_local_experts") or config["num_experts"]
        found.append(f"MoE {experts} experts top-{config['num_experts_per_tok']}, aux coef "
                     f"{config['router_aux_loss_coef']}")
    scaling = config.get("rope_scaling") or {}
    rope = scaling.get("rope_type") or scaling.get("type")  # Phi-3.5's config still spells it `type`
    if rope:
        found.append(f"rope {rope}")
    if facts["extra_rows"]:
        found.append("padded vocabulary")
    found.append("no pad token" if facts.get("pad") is None else f"pad {facts['pad']}")
    return ", ".join(found)


def measure(family: str, path: Path) -> dict:
    """Every cell of the family's row."""
    row = {"family": family, "hub": tiny_arch.families()[family]["hub"], "features": features(family),
           "params": sum(p.numel() for p in load_base_model(run_cfg(path, family).model).parameters())}
    moe = is_mixture_of_experts(official(family))
    for method in METHODS:
        if method == "qlora" and moe:
            row[method] = None  # refused at validation: the fused experts cannot be quantized
            continue
        losses = training_losses(path, family, method)
        row[method] = (losses[0], losses[-1])
    row["packed"] = {attn: packed_gap(path, family, attn) for attn in attention_kernels(family)}
    row["merge"] = merge_gap(path, family)
    row["plan"] = all(a == b for a, b in (plan_and_model_counts(path, family, m) for m in ("lora", "full")))
    row["experts"] = expert_lora_parameters(path, family) if moe else 0
    row["router"] = router_aux_loss(path, family) if moe else None
    row["unnarrowed"] = unnarrowed_gap(path, family) if sliding_layers(official(family)) else None
    return row


def markdown(rows: list[dict], seconds: float) -> str:
    """results/models.md."""
    lines = [
        "# The model matrix", "",
        f"`python scripts/model_matrix.py` ({seconds:.0f} s on this machine; the same checks run as "
        "`pytest -m models`). Each family is a tiny random-weight copy of the official config.json shipped under "
        "`ftune/configs/hub/`, every architectural feature kept (scripts/tiny_arch.py); features are the official "
        "config's (the tiny copy keeps each switch at tiny sizes: 4 experts top-2, a window of 8). Losses: first -> "
        "last of "
        f"{STEPS} steps on one batch. Packed: |packed - unpacked| / unpacked summed loss, documents longer than "
        "the sliding window (8). Merge: max |merged - adapter| logit / max |logit|. Plan: `ftune plan`'s total and "
        "trainable counts equal the instantiated model's (LoRA and full). Unnarrowed: the eager packed gap if the "
        "block mask reached sliding layers as it is (what `ftune/model/attention.py` prevents). Expert LoRA: "
        "trainable LoRA parameters on the fused expert weights (r=8); router aux: the balancing loss added with "
        "the config's coefficient and logged as `router_loss`.", "",
        "| family | features | params | LoRA | full | QLoRA | packed eager | packed sdpa | unnarrowed | merge "
        "| plan | expert LoRA | router aux |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        losses = [f"{r[m][0]:.3f} -> {r[m][1]:.3f}" if r[m] else "refused (experts)" for m in METHODS]
        sdpa = f"{r['packed']['sdpa']:.1e}" if "sdpa" in r["packed"] else "refused (soft-capping)"
        unnarrowed = f"{r['unnarrowed']:.1e}" if r["unnarrowed"] is not None else "–"
        router = f"{r['router']:.3f}" if r["router"] is not None else "–"
        features_cell = r["features"].replace("|", "\\|")  # pad tokens such as <|endoftext|>
        lines.append(f"| {r['family']} (`{r['hub']}`) | {features_cell} | {r['params']:,} | {' | '.join(losses)} | "
                     f"{r['packed']['eager']:.1e} | {sdpa} | {unnarrowed} | {r['merge']:.1e} | "
                     f"{'equal' if r['plan'] else 'DIFFER'} | {r['experts'] or '–'} | {router} |")
    lines += ["", REFUSALS]
    return "\n".join(lines) + "\n"


REFUSALS = """## Refused at validation (one line, exit code 2, before anything loads)

- `model.attn_implementation=sdpa` on Gemma 2: sdpa drops its attention logit soft-capping (transformers refuses
  it too); use `eager`.
- `lora.dropout` > 0 with `all-linear` LoRA on a mixture-of-experts model: the fused expert weights are adapted
  through PEFT's `target_parameters`, which has no dropout; set `lora.dropout=0`.
- `quant.bits` on a mixture-of-experts model: bitsandbytes quantizes linear layers only, so the fused experts
  (most of the weights) would stay unquantized and k-bit preparation would upcast them to fp32; use LoRA on a
  16-bit base.
- `data.packing=true` on a sliding-window architecture whose per-layer masks ftune does not know
  (`ftune/config/architecture.py`); every family above is known.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "models.md")
    parser.add_argument("names", nargs="*", help="families (default: all)")
    args = parser.parse_args()
    start, base = time.perf_counter(), tiny_arch.base_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in args.names or tiny_arch.families():
            rows.append(measure(name, tiny_arch.build(name, Path(tmp), base)))
            print(rows[-1], flush=True)
    args.out.write_text(markdown(rows, time.perf_counter() - start))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
