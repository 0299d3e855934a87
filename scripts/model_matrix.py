"""The model matrix: measure ftune's promises on tiny copies of every decoder architecture, write results/models.md.

    python scripts/model_matrix.py                                 # families, then the whole zoo
    python scripts/model_matrix.py --out /tmp/models.md qwen3-8b olmo2   # some families and zoo model_types

Two tables. Families: tiny copies of the official config.json files shipped under ftune/configs/hub, with their
real tokenizer facts (scripts/tiny_arch.py, scripts/model_families.yaml). The zoo: every other decoder-only
causal LM transformers registers, built from its config class's defaults (scripts/arch_zoo.py). Each check is a
cell: the loss before and after a few steps of LoRA (all-linear), and for families full fine-tuning and QLoRA;
|packed - unpacked| / unpacked loss on every CPU attention kernel the model allows, with documents longer than the
sliding window; |merged - adapter| logits relative to the largest logit; whether `ftune plan` (`plan_run`) counts
the parameters of the instantiated model, LoRA and full; and `ftune export format=gguf` with its llama.cpp parity
checks, for the architectures llama.cpp's converter maps (scripts/llama_cpp_architectures.json). A failed check
is a red cell whose reason, the error's first line, is listed under its table. tests/model/test_families.py
asserts the same checks (pytest -m models) on the families and one zoo architecture per quirk.
"""

import argparse
import json
import multiprocessing
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import arch_zoo
import tiny_arch
import torch
import torch.nn.functional as F

from ftune.config.architecture import is_mixture_of_experts, sdpa_problem, sliding_layers
from ftune.config.compose import load_run_config
from ftune.data.collate import PackedCollator
from ftune.data.mask import IGNORE_INDEX
from ftune.data.packing import pack
from ftune.errors import ConfigError
from ftune.model.load import count_parameters, load_base_model, load_tokenizer, prepare_model

REPO = Path(__file__).resolve().parents[1]
LLAMA_CPP = json.loads((Path(__file__).with_name("llama_cpp_architectures.json")).read_text())
"""HF architecture -> llama.cpp architecture, from llama.cpp's converter (scripts/llama_cpp_archs.py)."""
TEXTS = ("Leo has sold the new cup, and he is drinking the milk now.",
         "Put this in the present perfect: Jack drank the milk.",
         "Answer with the sentence only.")
"""Three documents, two longer than the tiny models' sliding window."""
METHODS = {"lora": (["method.name=lora"], 1e-2), "full": (["method.name=full"], 1e-3),
           "qlora": (["method.name=lora", "quant.bits=4", "quant.compute_dtype=fp32"], 1e-2)}
"""Method -> (overrides, learning rate of the few-step check)."""
STEPS = 8
"""AdamW steps of the training check on one fixed batch."""
MIN_DROP = 0.005
"""A method trains when its last loss is at least this fraction below its first (see `trains`)."""
PACKED_TOLERANCE = 1e-5
"""Relative gap allowed between packed and unpacked loss (fp32)."""
MERGE_TOLERANCE = 1e-4
"""Largest |merged - adapter| logit, relative to the largest logit (fp32)."""
QK_NORM = ("qwen3", "qwen3_moe", "olmo2")


@dataclass
class Cell:
    """One check's outcome: its figure, or why it failed (`passed` False), or why it does not apply (None)."""

    text: str
    passed: bool | None = True
    reason: str = ""


def attempt(check: Callable[..., Cell], *args) -> Cell:
    """`check(*args)`, any error turned into a red cell whose reason is the error's first line."""
    try:
        return check(*args)
    except Exception as err:  # every failure of every architecture is a finding of the matrix
        return Cell("FAIL", False, first_line(err))


def first_line(err: BaseException) -> str:
    """`Type: first line of the message`, temporary directories replaced by `<tmp>` so equal causes group."""
    text = (str(err).strip().splitlines() or [""])[0]
    text = re.sub(r"/tmp/[^\s:'\",)]*", "<tmp>", text)
    return f"{type(err).__name__}: {text[:220]}"


def model_config(path: Path) -> dict:
    """The tiny model's config.json."""
    return json.loads((path / "config.json").read_text())


def has_sdpa(path: Path) -> bool:
    """Whether transformers has an sdpa kernel for the model's class."""
    import transformers

    return bool(getattr(transformers, model_config(path)["architectures"][0])._supports_sdpa)


def attention_kernels(path: Path) -> list[str]:
    """The CPU attention implementations the model allows: eager, and sdpa unless transformers or ftune refuse."""
    allowed = has_sdpa(path) and sdpa_problem(model_config(path)) is None
    return ["eager", "sdpa"] if allowed else ["eager"]


@cache
def run_cfg(path: Path, *overrides: str):
    """A validated run config for the tiny model at `path` (no LoRA dropout: the checks compare exact numbers).

    Cached: composing one takes most of a second, and each row asks for the same few.
    """
    return load_run_config([f"model.name_or_path={path}", f"model.attn_implementation={attention_kernels(path)[-1]}",
                            "lora.dropout=0", *overrides])[0]


def token_batch(tokenizer) -> torch.Tensor:
    """`TEXTS` as one batch of equal-length rows (cut to the shortest)."""
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    width = min(map(len, ids))
    return torch.tensor([row[:width] for row in ids])


def mean_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def training_losses(path: Path, method: str) -> list[float]:
    """The loss at each of `STEPS` AdamW steps of `method` on one fixed batch, through ftune's prepare_model."""
    overrides, lr = METHODS[method]
    cfg = run_cfg(path, *overrides)
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


def packing_refusal(path: Path, attn: str) -> None:
    """What `ftune train` does before training with `data.packing=true`: validation, then the isolation check."""
    from ftune.train.isolation import check_packing_isolates

    cfg = run_cfg(path, f"model.attn_implementation={attn}", "data.packing=true")
    check_packing_isolates(prepare_model(cfg), load_tokenizer(cfg.model).pad_token_id, attn, path.name)


def packed_gap(path: Path, attn: str) -> float:
    """|packed - unpacked| / unpacked loss with ftune's loading and `attn`, packing validated as a run's is."""
    cfg = run_cfg(path, f"model.attn_implementation={attn}", "data.packing=true")
    packed, alone = packed_and_unpacked(load_base_model(cfg.model).eval(), load_tokenizer(cfg.model), attn)
    return abs(packed - alone) / alone


def unnarrowed_gap(path: Path) -> float:
    """The packed/unpacked gap of eager attention if the block mask reached sliding layers as it is."""
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    packed, alone = packed_and_unpacked(plain, load_tokenizer(run_cfg(path).model), "eager")
    return abs(packed - alone) / alone


def router_aux_loss(path: Path) -> float:
    """The router's balancing loss ftune adds (before its coefficient) on one batch of the LoRA model."""
    from ftune.model.moe import add_router_loss

    cfg = run_cfg(path)
    model = prepare_model(cfg)
    ids = token_batch(load_tokenizer(cfg.model))
    with torch.no_grad():
        model(input_ids=ids)
        parts = add_router_loss(model, {"labels": ids}, {"loss": torch.tensor(0.0)}, torch.tensor(1))
    return parts["router_loss"].item()


def merge_gap(path: Path) -> float:
    """|merged - adapter| logits over the largest logit, for a LoRA whose B matrices are non-zero."""
    cfg = run_cfg(path)
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


def plan_and_model_counts(path: Path, method: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(total, trainable) as `ftune plan` counts them (`plan_run` on CPU), and on the instantiated model."""
    from ftune.plan.estimate import plan_run
    from ftune.train.losses import build_step_loss

    cfg = run_cfg(path, f"method.name={method}")
    plan = plan_run(cfg, device="cpu", step_loss=build_step_loss)
    return (plan.total_params, plan.trainable_params), count_parameters(prepare_model(cfg))


def expert_lora_parameters(path: Path) -> int:
    """Trainable LoRA parameters on the fused MoE expert weights under all-linear."""
    model = prepare_model(run_cfg(path))
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and ".experts." in name)


def gguf_export(path: Path, out: Path) -> dict:
    """`ftune export model=<path> format=gguf quant=f16`: the export report's parity checks (llama.cpp vs torch)."""
    from ftune.config.commands import ExportCfg
    from ftune.export.exporter import export

    return export(ExportCfg(model=str(path), format="gguf", quant="f16", out=str(out))).parity


def trains(losses: list[float]) -> bool:
    """The last loss is at least `MIN_DROP` below the first.

    On one fixed batch, computed deterministically, any fall is learning, not noise (that is ~1e-6 here): an adapter
    that never reaches the output (zero gradients) leaves the loss exactly flat, a wrong gradient sends it up. How
    far it falls in a few steps depends on the random model's scale (Cohere's `logit_scale` of 1/16 moves its
    logits, and its loss, by 1% in 8 steps), and a step may go up on the way (a router switching experts), so the
    check is a small, certain fall from first to last.
    """
    return losses[-1] < (1 - MIN_DROP) * losses[0]


def training_cell(path: Path, method: str) -> Cell:
    """The first -> last loss of `method`: red unless `trains`; refused (QLoRA on MoE): grey."""
    try:
        losses = training_losses(path, method)
    except ConfigError as err:
        if method == "qlora" and err.message.startswith("quant.bits"):
            return Cell("refused", None, err.message)
        raise
    return Cell(f"{losses[0]:.3f} -> {losses[-1]:.3f}", trains(losses),
                "" if trains(losses) else f"the loss did not fall by {MIN_DROP:.1%} in {STEPS} steps: "
                + ", ".join(f"{loss:.3f}" for loss in losses))


def packed_cell(path: Path, attn: str) -> Cell:
    """The packed/unpacked gap; grey where the kernel does not apply or ftune refuses packing on the model."""
    if attn not in attention_kernels(path):
        why = f"ftune refuses sdpa: {sdpa_problem(model_config(path))}" if has_sdpa(path) \
            else "transformers has no sdpa kernel for this class"
        return Cell("–", None, why)
    try:
        packing_refusal(path, attn)
    except ConfigError as err:
        return Cell("refused", None, err.message)
    gap = packed_gap(path, attn)
    return Cell(f"{gap:.1e}", gap < PACKED_TOLERANCE, "" if gap < PACKED_TOLERANCE else
                f"packed loss differs from unpacked by {gap:.1e} (tolerance {PACKED_TOLERANCE:.0e})")


def merge_cell(path: Path) -> Cell:
    gap = merge_gap(path)
    return Cell(f"{gap:.1e}", gap <= MERGE_TOLERANCE, "" if gap <= MERGE_TOLERANCE else
                f"merged logits differ from base+adapter by {gap:.1e} of the largest logit")


def plan_cell(path: Path, methods: tuple[str, ...] = ("lora",)) -> Cell:
    """Red unless `plan_run`'s (total, trainable) equal the instantiated model's for each of `methods`."""
    differ = []
    for method in methods:
        planned, built = plan_and_model_counts(path, method)
        if planned != built:
            differ.append(f"{method}: planned {planned[0]:,}/{planned[1]:,}, built {built[0]:,}/{built[1]:,}")
    return Cell("equal", not differ, "(total/trainable) " + "; ".join(differ) if differ else "")


def gguf_cell(path: Path, scratch: Path) -> Cell:
    """The export's parity report, for architectures llama.cpp's converter maps (else grey)."""
    hf_arch = model_config(path)["architectures"][0]
    if hf_arch not in LLAMA_CPP:
        return Cell("–", None, f"llama.cpp's converter does not map {hf_arch}")
    out = scratch / f"{path.name}-gguf"
    checks = gguf_export(path, out)["checks"]
    failed = [name for name, check in checks.items() if not check["passed"]]
    return Cell("f16 parity" if not failed else "FAIL", not failed, "failed: " + ", ".join(failed))


CHECKS = ("LoRA", "packed eager", "packed sdpa", "merge", "plan", "GGUF")
"""The checks of every row (families add full fine-tuning and QLoRA)."""
CHECK_FUNCTIONS: dict[str, Callable[[Path, Path], Cell]] = {
    "LoRA": lambda path, scratch: training_cell(path, "lora"),
    "packed eager": lambda path, scratch: packed_cell(path, "eager"),
    "packed sdpa": lambda path, scratch: packed_cell(path, "sdpa"),
    "merge": lambda path, scratch: merge_cell(path),
    "plan": lambda path, scratch: plan_cell(path),
    "GGUF": gguf_cell,
}
"""Check -> its cell for the tiny model at `path` (`scratch`: a directory for exports); raises on errors."""


def check_cells(path: Path, scratch: Path) -> dict[str, Cell]:
    """The `CHECKS` of one tiny model, each failure caught into its cell."""
    return {check: attempt(CHECK_FUNCTIONS[check], path, scratch) for check in CHECKS}


def official(family: str) -> dict:
    """The shipped official config.json the family's tiny model is built from."""
    return tiny_arch.official_config(tiny_arch.families()[family]["hub"])


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


def measure_family(family: str, path: Path, scratch: Path) -> dict:
    """Every cell of the family's row: the shared checks, full and QLoRA, and the family's own figures."""
    config = official(family)
    row = {"name": f"{family} (`{tiny_arch.families()[family]['hub']}`)", "features": features(family),
           "params": sum(p.numel() for p in load_base_model(run_cfg(path).model).parameters())}
    cells = check_cells(path, scratch)
    cells |= {"full": attempt(training_cell, path, "full"), "QLoRA": attempt(training_cell, path, "qlora"),
              "plan": attempt(plan_cell, path, ("lora", "full"))}
    cells["unnarrowed"] = attempt(lambda: Cell(f"{unnarrowed_gap(path):.1e}", None)) if sliding_layers(config) \
        else Cell("–", None)
    moe = is_mixture_of_experts(config)
    cells["expert LoRA"] = attempt(lambda: Cell(f"{expert_lora_parameters(path)}", None)) if moe else Cell("–", None)
    cells["router aux"] = attempt(lambda: Cell(f"{router_aux_loss(path):.3f}", None)) if moe else Cell("–", None)
    return row | {"cells": cells}


def measure_zoo(model_type: str, out: Path, base, scratch: Path) -> dict:
    """Every cell of a zoo architecture's row; a model that does not build fails every check."""
    row = {"name": f"{model_type} (`{arch_zoo.causal_lm_classes()[model_type]}`)"}
    try:
        path = arch_zoo.build(model_type, out, base)
    except Exception as err:  # an architecture whose tiny copy does not build is a finding
        failed = Cell("not built", False, "build: " + first_line(err))
        return row | {"features": "", "params": 0, "cells": {check: failed for check in CHECKS}}
    model = load_base_model(run_cfg(path).model)
    row |= {"features": ", ".join(arch_zoo.detect_features(model)),
            "params": sum(p.numel() for p in model.parameters())}
    return row | {"cells": check_cells(path, scratch)}


FAMILY_COLUMNS = ("LoRA", "full", "QLoRA", "packed eager", "packed sdpa", "unnarrowed", "merge", "plan", "GGUF",
                  "expert LoRA", "router aux")


def table(rows: list[dict], columns: tuple[str, ...], footnotes: dict[str, int]) -> list[str]:
    """A markdown table, red cells as `FAIL [n]` where n numbers their reason in `footnotes` (shared, in order)."""
    lines = ["| architecture | features | params | " + " | ".join(columns) + " |",
             "|---|---|---:|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for column in columns:
            cell = row["cells"][column]
            if cell.passed is False:
                number = footnotes.setdefault(cell.reason, len(footnotes) + 1)
                cells.append(f"**{cell.text} [{number}]**")
            else:
                cells.append(cell.text)
        features_cell = row["features"].replace("|", "\\|")  # pad tokens such as <|endoftext|>
        lines.append(f"| {row['name']} | {features_cell} | {row['params']:,} | {' | '.join(cells)} |")
    return lines


def reasons(rows: list[dict], footnotes: dict[str, int], start: int) -> list[str]:
    """The reason of every red cell numbered from `start`, with the cells it explains."""
    where: dict[str, list[str]] = {}
    for row in rows:
        for column, cell in row["cells"].items():
            if cell.passed is False:
                where.setdefault(cell.reason, []).append(f"{row['name'].split(' ')[0]} ({column})")
    return [f"{number}. `{reason}` — {', '.join(where[reason])}" for reason, number in footnotes.items()
            if number >= start and reason in where]


def all_green(row: dict) -> bool:
    return all(cell.passed is not False for cell in row["cells"].values())


def markdown(families: list[dict], zoo: list[dict], seconds: float) -> str:
    """results/models.md."""
    footnotes: dict[str, int] = {}
    green = sum(map(all_green, families + zoo))
    lines = [
        "# The model matrix", "",
        f"`python scripts/model_matrix.py`: {len(families) + len(zoo)} architectures in {seconds / 60:.0f} min on "
        f"this machine (2 CPU cores); **{green} pass every check**. `pytest -m models` runs the same checks on the "
        "families and one zoo architecture per quirk (tests/model/test_families.py). A red cell is **FAIL [n]**, "
        "n numbering its reason (the error's first line) under its table; – is a check that does not apply.", "",
        f"Checks. LoRA (all-linear), full, QLoRA: first -> last loss of {STEPS} AdamW steps on one batch (red unless "
        f"the last is {MIN_DROP:.1%} below the first). Packed: |packed - unpacked| / unpacked summed loss through "
        "ftune's collator, packing validated as a run's, with documents longer than the sliding window (8); red above "
        f"{PACKED_TOLERANCE:.0e}. Merge: max |merged - adapter| logit / max |logit|, red above "
        f"{MERGE_TOLERANCE:.0e}. Plan: `ftune plan`'s (`plan_run`, CPU) total and trainable counts equal the "
        "instantiated model's, LoRA (and full, for families). GGUF: `ftune export format=gguf quant=f16` and its "
        "llama.cpp parity checks, for architectures llama.cpp's converter maps "
        "(scripts/llama_cpp_architectures.json, from its registry).", "",
        f"## Families ({sum(map(all_green, families))} of {len(families)} pass every check)", "",
        "Tiny random-weight copies of the official config.json files shipped under `ftune/configs/hub/`, with the "
        "real tokenizer's special tokens, pad token and embedding padding (scripts/tiny_arch.py); features are "
        "the official config's (the tiny copy keeps each switch at tiny sizes: 4 experts top-2, a window of 8). "
        "Unnarrowed: the eager packed gap if the block mask reached sliding layers as it is (what "
        "`ftune/model/attention.py` prevents). Expert LoRA: trainable LoRA parameters on the fused expert weights "
        "(r=8); router aux: the balancing loss added with the config's coefficient and logged as `router_loss`.", "",
    ]
    lines += table(families, FAMILY_COLUMNS, footnotes)
    lines += ["", *reasons(families, footnotes, 1), ""]
    first_zoo = len(footnotes) + 1
    lines += [f"## Every other decoder-only causal LM of transformers ({sum(map(all_green, zoo))} of {len(zoo)} "
              "pass every check)", "",
              "Each architecture of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` (aliases of one class once), built from its "
              "config class's defaults shrunk by scripts/arch_zoo.py: hidden 64, 4 heads of 16 (key/value heads "
              "kept equal, single or grouped), 2 layers or enough to hold every layer type, 4 experts top-2, a "
              "window of 8, every switch kept; ChatML tokens on the shared byte-level BPE. Features are detected "
              "on the built model.", ""]
    lines += table(zoo, CHECKS, footnotes)
    lines += ["", *reasons(zoo, footnotes, first_zoo), "", *left_out()]
    return "\n".join(lines) + "\n"


def left_out() -> list[str]:
    """The causal LMs the zoo does not build, with the detected reason, and the aliases it builds once."""
    lines = ["## Left out", ""]
    lines += [f"- {t}: {why}" for t in arch_zoo.causal_lm_classes() if (why := arch_zoo.skip_reason(t))]
    lines += ["", "Aliases (another model_type registered with the same class, built once): " + "; ".join(
        f"{kept}: {', '.join(others)}" for kept, others in arch_zoo.aliases().items() if others) + "."]
    return lines


WORKER: dict = {}
"""This process's tokenizer base and directories (set by `start_worker`)."""


def start_worker(root: str) -> None:
    """One torch thread per process (tiny models gain nothing from more, and threads spin on shared cores)."""
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    WORKER.update(base=tiny_arch.base_tokenizer(), models=Path(root) / "models", scratch=Path(root) / "exports")
    WORKER["scratch"].mkdir(parents=True, exist_ok=True)


def measure(name: str) -> tuple[str, dict]:
    """The row of family or zoo architecture `name`, and a progress line."""
    began, scratch = time.perf_counter(), WORKER["scratch"]
    if name in tiny_arch.families():
        row = measure_family(name, tiny_arch.build(name, WORKER["models"], WORKER["base"]), scratch)
    else:
        row = measure_zoo(name, WORKER["models"], WORKER["base"], scratch)
    cells = ", ".join(f"{k}={c.text}" + (f" [{c.reason}]" if c.passed is False else "")
                      for k, c in row["cells"].items())
    return name, row | {"progress": f"{name} ({time.perf_counter() - began:.1f} s): {cells}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "results" / "models.md")
    parser.add_argument("--jobs", type=int, default=2, help="processes, one torch thread each (default: 2 cores)")
    parser.add_argument("names", nargs="*", help="families and zoo model_types (default: all)")
    args = parser.parse_args()
    start = time.perf_counter()
    names = args.names or [*tiny_arch.families(), *arch_zoo.architectures()]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.jobs == 1:
            start_worker(tmp)
            results = map(measure, names)
        else:
            pool = multiprocessing.get_context("fork").Pool(args.jobs, start_worker, (tmp,), maxtasksperchild=8)
            results = pool.imap_unordered(measure, names)
        for name, row in results:
            print(row["progress"], flush=True)
            rows[name] = row
            write(args.out, names, rows, time.perf_counter() - start)  # a long run leaves its rows so far
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f} s")


def write(out: Path, names: list[str], rows: dict[str, dict], seconds: float) -> None:
    """results/models.md from the rows measured so far, in the order of `names`."""
    families = [rows[name] for name in names if name in rows and name in tiny_arch.families()]
    zoo = [rows[name] for name in names if name in rows and name not in tiny_arch.families()]
    out.write_text(markdown(families, zoo, seconds))


if __name__ == "__main__":
    main()
