"""What a run directory says about its model, gathered for the model card (`ftune.report.card`).

Read from the records a run leaves (config.yaml, metrics.jsonl, summary.json when the run has finished), so
`final/` gets its card while training ends and `ftune export` builds the same facts from the directory later.
"""

import json
from pathlib import Path

import torch
import yaml

from ftune.model.load import BIASES
from ftune.report.card import EVAL_KEYS, CardFacts

CONFIG_FILE = "config.yaml"
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "rslora", "dora")
LORA_SHAPED = ("lora", "qlora", "adalora", "vera", "loha", "lokr")
"""Methods whose adapter is shaped by the `lora.*` keys (rank, scale, targets, dropout)."""
OPTIM_KEYS = ("name", "lr", "scheduler", "warmup_ratio", "weight_decay")


def run_card_facts(run_dir: Path, hardware: str | None = None) -> CardFacts:
    """The card facts of the run in `run_dir`.

    Args:
        run_dir: a run directory with config.yaml and metrics.jsonl (summary.json once the run has ended).
        hardware: what trained it, when known by the caller; otherwise read from summary.json.
    """
    config = yaml.safe_load((run_dir / CONFIG_FILE).read_text())
    summary = read_json(run_dir / "summary.json")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluations = [row for row in rows if "eval_loss" in row or "probe_ppl" in row]
    steps = [row for row in rows if "loss" in row]
    sources = data_sources(config["data"])
    method = method_name(config)
    objective = config.get("objective", {}).get("name", "sft")
    return CardFacts(
        title=f"{Path(config['model']['name_or_path']).name} {method} ({config.get('recipe', 'ftune')})",
        base_model=config["model"]["name_or_path"], library="peft" if method != "full" else "transformers",
        method=method, hyperparameters=hyperparameters(config, method, objective), data_sources=sources,
        datasets=[path for path, _ in sources if looks_like_hub_dataset(path)],
        max_length=config["data"].get("max_length"),
        steps=summary.get("steps", steps[-1]["step"] if steps else None),
        epochs=summary.get("epochs", steps[-1].get("epoch") if steps else None),
        stop_reason=summary.get("stop_reason"),
        eval_metrics={key: evaluations[-1][key] for key in EVAL_KEYS if evaluations and key in evaluations[-1]},
        hardware=hardware or summary.get("hardware"),
        wall_time_s=summary.get("wall_time_s"),
        logged_time_s=steps[-1]["time"] - steps[0]["time"] if len(steps) > 1 else None,
        tags=[method] + ([objective] if objective not in ("sft", method) else []),
    )


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} when the file is not there (a run still training has no summary)."""
    return json.loads(path.read_text()) if path.is_file() else {}


def method_name(config: dict) -> str:
    """lora, qlora (LoRA on a quantized base), full, bitfit (biases alone), distill (a full student), or PEFT's."""
    name = config["method"]["name"]
    if name == "lora" and config.get("quant", {}).get("bits", 0) > 0:
        return "qlora"
    if name == "full" and config["method"].get("train_only") == [BIASES]:
        return "bitfit"
    if name == "full" and config.get("objective", {}).get("name") == "distill":
        return "distill"
    return name


def hyperparameters(config: dict, method: str, objective: str = "sft") -> dict[str, object]:
    """The settings that define the run: adapter shape, quantization, objective, optimizer, batch and precision."""
    values: dict[str, object] = {}
    if method in LORA_SHAPED:
        values |= {f"lora.{key}": config["lora"][key] for key in LORA_KEYS if key in config["lora"]}
    if method == "qlora":
        values |= {"quant.bits": config["quant"]["bits"], "quant.type": config["quant"]["type"]}
    if objective == "distill":
        values |= {f"distill.{key}": config["distill"][key] for key in ("teacher", "alpha", "temperature")}
    if objective in ("dpo", "kto"):
        values |= {f"pref.{key}": config["pref"][key] for key in ("loss", "beta")}
    values |= {f"optim.{key}": config["optim"][key] for key in OPTIM_KEYS if key in config["optim"]}
    trainer = config["trainer"]
    values |= {"batch": trainer["micro_batch_size"] * trainer["grad_accum"],
               "mixed_precision": trainer["mixed_precision"], "seed": config.get("seed")}
    return values


def data_sources(data: dict) -> list[tuple[str, int | None]]:
    """Each training source with its number of records (counted for local JSONL files; None otherwise)."""
    paths = [source["path"] for source in data.get("mix") or []] or [data["path"]]
    return [(path, count_records(Path(path))) for path in paths]


def count_records(path: Path) -> int | None:
    """Non-empty lines of a local .jsonl file (one record each); None for other files, directories and hub ids."""
    if path.suffix != ".jsonl" or not path.is_file():
        return None
    with path.open(encoding="utf-8") as lines:
        return sum(1 for line in lines if line.strip())


def looks_like_hub_dataset(path: str) -> bool:
    """A `datasets` hub id (`org/name`, optionally `:split`) rather than a local path."""
    return not Path(path.split(":")[0]).exists() and path.count("/") == 1 and not path.startswith((".", "/", "~"))


def describe_hardware(device: torch.device, processes: int) -> str:
    """The accelerator a run used, e.g. "1 x NVIDIA H100 80GB HBM3" or "CPU (2 cores)"."""
    if device.type == "cuda":
        return f"{processes} x {torch.cuda.get_device_name(device)}"
    return f"CPU ({torch.get_num_threads()} threads) x {processes} process(es)"
