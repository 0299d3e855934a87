"""Does LoRA forget less than full fine-tuning? A forgetting study on ftune's embedded model.

The claim under test: fine-tuned with LoRA on a narrow task, a model keeps its perplexity on unrelated text
within 5% of the base model's, while full fine-tuning with the same budget drifts visibly.

The embedded model (ftune/assets/models/tiny) was pretrained on tinyworld documents that use every verb. Here
it is fine-tuned, through the real `ftune train` CLI, on documents whose verbs are all IRREGULAR (the narrow
task), and measured by `ftune eval` on held-out documents of two kinds:
  - task: held-out irregular-verb documents (does the fine-tune learn its task?);
  - control: held-out documents with only REGULAR verbs, used as ftune's forgetting probe (`probe_drift` is
    the control perplexity over the base model's, minus one).
Task and control differ only in the verb table; both have the document format the model was pretrained on.
(Held-out single sentences would confound the study: fine-tuning on documents raises, and fine-tuning on
sentences lowers, sentence perplexity by 20-30% for BOTH verb kinds, far more than the verb effect.)

Runs, all with the same steps, batch, seed and training documents (one pass, no document seen twice):
  - full fine-tuning at lr 2e-4 and LoRA at lr 1e-3, the learning rates of the tiny_full / tiny_lora recipes;
  - LoRA ranks r in RANKS (alpha 16, all linear layers, as the tiny_lora recipe); r=8 is the LoRA of the claim.

    python scripts/forgetting_study.py            # ~7 min on one CPU core -> results/forgetting.json + 2 PNGs
    python scripts/forgetting_study.py --quick    # smoke test with a tiny budget, about a minute

Data seeds are disjoint from those of pretraining (1, evaluation 2; scripts/build_tiny_model.py) and of the
shipped datasets (3-5; scripts/build_datasets.py). Training runs, data and ftune's cache go under --out
(git-ignored runs/ by default); only the JSON and the two plots are meant to be kept.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import tinyworld as world

REPO = Path(__file__).resolve().parents[1]
BASE_MODEL = REPO / "ftune" / "assets" / "models" / "tiny"
TRAIN_SEED, TASK_SEED, CONTROL_SEED = 11, 12, 13
RANKS = (1, 4, 8, 32)
CLAIM_RANK = 8  # the tiny_lora recipe's rank
LEARNING_RATES = {"lora": 1e-3, "full": 2e-4}  # those of recipes/tiny_lora.yaml and recipes/tiny_full.yaml
MICRO_BATCH = 8  # the tiny trainer's micro-batch, for every run
MAX_DRIFT = 0.05  # the claim: LoRA's control perplexity stays within 5% of the base model's


@dataclass(frozen=True)
class Budget:
    """How long each run trains, how often it evaluates, and how many held-out documents each split has."""

    steps: int
    eval_every: int
    eval_documents: int

    @property
    def train_documents(self) -> int:
        """Exactly one pass: every step sees fresh documents, as in pretraining."""
        return self.steps * MICRO_BATCH


# 300 steps: LoRA's task perplexity has flattened by then (the cosine schedule has decayed); ~70 s a run.
FULL_BUDGET = Budget(steps=300, eval_every=50, eval_documents=200)
QUICK_BUDGET = Budget(steps=15, eval_every=15, eval_documents=48)


@dataclass(frozen=True)
class RunSpec:
    """One training run: a method (trained from its tiny recipe, at the method's learning rate) and a LoRA rank."""

    method: str  # "full" or "lora"
    rank: int | None = None

    @property
    def name(self) -> str:
        """The run's directory in the work directory (`method_overrides` names LoRA's the same way)."""
        return "full" if self.rank is None else f"lora_r{self.rank}"

    @property
    def label(self) -> str:
        return "full FT" if self.rank is None else f"LoRA r={self.rank}"


RUNS = (RunSpec("full"), *(RunSpec("lora", rank) for rank in RANKS))


@dataclass(frozen=True)
class Data:
    """The JSONL files of the study."""

    train: Path
    task: Path
    control: Path


def parse_args() -> argparse.Namespace:
    """Read the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--json",
        type=Path,
        help="results file; the PNGs go next to it "
        "(default: results/forgetting.json, or the work directory with --quick)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO / "runs" / "forgetting_study",
        help="parent of this study's work directory (data, runs, cache)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny budget, to check that everything runs")
    return parser.parse_args()


def write_jsonl(path: Path, texts: list[str]) -> Path:
    """Write `{"text": ...}` records, the format ftune trains on and probes with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def make_data(data_dir: Path, budget: Budget) -> Data:
    """Training and task documents with irregular verbs only, control documents with regular verbs only."""
    train = world.generate_documents(budget.train_documents, TRAIN_SEED, "irregular")
    task = world.generate_documents(budget.eval_documents, TASK_SEED, "irregular")
    control = world.generate_documents(budget.eval_documents, CONTROL_SEED, "regular")
    return Data(
        train=write_jsonl(data_dir / "train.jsonl", train),
        task=write_jsonl(data_dir / "task.jsonl", task),
        control=write_jsonl(data_dir / "control.jsonl", control),
    )


def run_ftune(args: list[str], log: Path, env: dict[str, str]) -> None:
    """Run an ftune command in its own process (as a user would), its output to `log`; stop on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        code = subprocess.run(
            [sys.executable, "-m", "ftune", *args],
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            check=False,
        ).returncode
    if code != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        sys.exit(f"ftune {args[0]} failed (exit code {code}), see {log}:\n{tail}")


def shared_overrides(data: Data, budget: Budget) -> list[str]:
    """The `ftune train` settings of every run: same data, steps, batch and seed (the recipes' seed, 42).

    Each run evaluates the task split and probes the control split every `budget.eval_every` steps (the
    curves of the drift plot) and keeps its last weights in final/, so "after" means after the whole budget.
    """
    return [
        f"data.path={data.train}",
        f"data.eval_path={data.task}",
        "data.format=text",
        f"probe.path={data.control}",
        f"trainer.max_steps={budget.steps}",
        f"trainer.eval_every={budget.eval_every}",
        f"trainer.micro_batch_size={MICRO_BATCH}",
        "trainer.grad_accum=1",
        "trainer.save_every=0",
        "trainer.final_weights=last",
    ]


def method_overrides(work: Path) -> dict[str, list[str]]:
    """What sets each method's runs apart: its tiny recipe, its learning rate and, for LoRA, the ranks.

    Full fine-tuning is one run. LoRA is one sweep over RANKS (`ftune train -m`: every job composed and seeded
    afresh as a run of its own, in one process), so Python's start-up and imports, ~7 s, are paid once.
    """
    ranks = ",".join(str(rank) for rank in RANKS)
    return {
        "full": ["recipe=tiny_full", f"optim.lr={LEARNING_RATES['full']}", f"output_dir={work / 'full'}"],
        "lora": ["-m", "recipe=tiny_lora", f"optim.lr={LEARNING_RATES['lora']}", f"lora.r={ranks}",
                 f"output_dir={work}/lora_r${{lora.r}}"],
    }  # fmt: skip


def train(method: str, overrides: list[str], shared: list[str], work: Path, env: dict[str, str]) -> None:
    """Train the runs of one method with one `ftune train` command."""
    started = time.perf_counter()
    run_ftune(["train", *overrides, *shared], work / "logs" / f"train_{method}.log", env)
    print(f"  {method}: {time.perf_counter() - started:.0f} s", flush=True)


def evaluate(run_dirs: dict[str, Path], data: Data, work: Path, env: dict[str, str]) -> dict[str, dict]:
    """Task and control perplexity of the base model and of every run's final weights, with `ftune eval`.

    One command measures "before" (its reference row is the base) and "after" with the same code and
    precision, so the two compare exactly; returns `{"base" or run name: ftune eval's row}`.
    """
    out = work / "eval.json"
    finals = [str(run_dir / "final") for run_dir in run_dirs.values()]
    run_ftune(
        [
            "eval",
            f"model={BASE_MODEL}",
            f"models=[{','.join(finals)}]",
            f"data={data.task}",
            f"probe={data.control}",
            "generate=0",
            f"batch_size={MICRO_BATCH}",
            f"out={out}",
        ],
        work / "logs" / "eval.log",
        env,
    )
    rows = json.loads(out.read_text())
    return {"base": rows[str(BASE_MODEL)], **{name: rows[final] for name, final in zip(run_dirs, finals, strict=True)}}


def curve(run_dir: Path, base: dict) -> list[dict]:
    """Task perplexity and control drift at each evaluation of the run, from its metrics.jsonl.

    ftune train evaluates only after steps, so step 0 is the base model's row from `ftune eval`.
    """
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    points = [{"step": 0, "task_ppl": base["eval_ppl"], "probe_drift": 0.0}]
    return points + [
        {"step": row["step"], "task_ppl": row["eval_ppl"], "probe_drift": row["probe_drift"]}
        for row in rows
        if "eval_ppl" in row
    ]


def describe_run(spec: RunSpec, run_dir: Path, rows: dict[str, dict]) -> dict:
    """One run's results: before (the base) and after (its final weights) on both splits, and its curve."""
    base, after = rows["base"], rows[spec.name]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "method": spec.method,
        "r": spec.rank,
        "lr": LEARNING_RATES[spec.method],
        "trainable_params": summary["trainable_params"],
        "task_ppl_before": base["eval_ppl"],
        "task_ppl_after": after["eval_ppl"],
        "probe_ppl_before": base["probe_ppl"],
        "probe_ppl_after": after["probe_ppl"],
        "probe_drift": after["probe_drift"],
        "steps": summary["steps"],
        "train_wall_s": summary["wall_time_s"],
        "curve": curve(run_dir, base),
    }


def label(run: dict) -> str:
    """A run's name in the plots and the table, from its results."""
    return RunSpec(run["method"], run["r"]).label


def claim_holds(lora: dict, full: dict) -> bool:
    """LoRA's control drift within MAX_DRIFT, full fine-tuning's beyond it (what "drifts visibly" is taken as)."""
    return abs(lora["probe_drift"]) <= MAX_DRIFT < full["probe_drift"]


def settings(budget: Budget, overrides: dict[str, list[str]], quick: bool) -> dict:
    """What every run shared, so that the JSON says how its numbers were made."""
    return {
        "quick": quick,
        **asdict(budget),
        "train_documents": budget.train_documents,
        "micro_batch_size": MICRO_BATCH,
        "lr": LEARNING_RATES,
        "lr_source": "recipes/tiny_lora.yaml and recipes/tiny_full.yaml",
        "ranks": list(RANKS),
        "claim_rank": CLAIM_RANK,
        "max_drift": MAX_DRIFT,
        "seeds": {"train": TRAIN_SEED, "task": TASK_SEED, "control": CONTROL_SEED},
        "splits": {
            "train": "tinyworld documents with irregular verbs only",
            "task": "held-out tinyworld documents with irregular verbs only (data.eval_path)",
            "control": "held-out tinyworld documents with regular verbs only (probe.path)",
        },
        "ftune_commit": ftune_commit(),
        "ftune_train_overrides": overrides,
        "measured_with": "ftune eval (fp32) of the base model and of each run's final/ (trainer.final_weights=last); "
        "curves from each run's metrics.jsonl",
    }


def ftune_commit() -> str:
    """The checkout's commit ("-dirty" with uncommitted changes): the numbers depend on ftune's code and recipes."""
    describe = ["git", "describe", "--always", "--dirty"]
    return subprocess.run(describe, cwd=REPO, capture_output=True, text=True, check=False).stdout.strip() or "unknown"


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, where `platform.processor()` is often empty)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor()


def machine() -> dict:
    """Where the study ran: its timings mean little without the CPU and thread count."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        **{package: version(package) for package in ("torch", "transformers", "peft", "accelerate")},
    }


def pyplot():
    """Pyplot on the Agg backend, drawing straight to files (no display), as ftune.report.plots does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    """Write the figure atomically (as ftune.report.plots does), so a reader never sees half a PNG."""
    plt = pyplot()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def plot_drift(results: dict, path: Path) -> None:
    """Control-perplexity drift of each run: after the budget (bars) and during training (lines), with the 5% line."""
    plt = pyplot()
    runs = [results["full"], *results["sweep"]]
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
    bars.bar(
        [label(run) for run in runs],
        [100 * run["probe_drift"] for run in runs],
        color=[f"C{i}" for i in range(len(runs))],
    )
    bars.set(title="Control perplexity drift after training", ylabel="control perplexity vs base (%)")
    for i, run in enumerate(runs):
        steps = [point["step"] for point in run["curve"]]
        lines.plot(
            steps,
            [100 * point["probe_drift"] for point in run["curve"]],
            marker="o",
            markersize=3,
            color=f"C{i}",
            label=f"{label(run)} (lr {run['lr']:g})",
        )
    lines.set(title="Control perplexity drift during training", xlabel="optimizer step")
    for ax in (bars, lines):
        ax.axhline(100 * MAX_DRIFT, color="red", linewidth=0.8, linestyle="--", label=f"claim: {MAX_DRIFT:.0%}")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_rank(results: dict, path: Path) -> None:
    """Task perplexity after training by LoRA rank, against the base model's and full fine-tuning's."""
    plt = pyplot()
    sweep, full = results["sweep"], results["full"]
    ranks = [run["r"] for run in sweep]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    lora_label = f"LoRA, after (lr {sweep[0]['lr']:g}); labels: control drift"
    ax.plot(ranks, [run["task_ppl_after"] for run in sweep], marker="o", label=lora_label)
    for run in sweep:
        ax.annotate(
            f"{run['probe_drift']:+.1%}",
            (run["r"], run["task_ppl_after"]),
            fontsize=8,
            textcoords="offset points",
            xytext=(0, 7),
            ha="center",
        )
    ax.axhline(full["task_ppl_before"], color="grey", linestyle="--", label="base model (before)")
    ax.axhline(full["task_ppl_after"], color="C3", linestyle=":", label=f"full FT, after (lr {full['lr']:g})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(rank) for rank in ranks])
    ax.minorticks_off()
    ax.set(title="Task perplexity by LoRA rank", xlabel="LoRA rank r", ylabel="held-out irregular-verb perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)  # the lines span the whole width
    save_figure(fig, path)


def print_table(results: dict) -> None:
    """The numbers of the study, one row per run, and the verdict on the claim."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="forgetting study (task: irregular verbs; control: regular verbs)", title_justify="left")
    for column in ("run", "lr", "trainable", "task ppl before -> after", "control ppl before -> after", "drift"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for run in (results["full"], *results["sweep"]):
        table.add_row(
            label(run),
            f"{run['lr']:g}",
            f"{run['trainable_params']:,}",
            f"{run['task_ppl_before']:.3f} -> {run['task_ppl_after']:.3f} "
            f"({run['task_ppl_after'] / run['task_ppl_before'] - 1:+.1%})",
            f"{run['probe_ppl_before']:.3f} -> {run['probe_ppl_after']:.3f}",
            f"{run['probe_drift']:+.2%}",
        )
    console = Console(width=max(120, Console().width))
    console.print(table)
    lora, full = results["lora"], results["full"]
    verdict = "holds" if results["claim_confirmed"] else "does not hold"
    console.print(
        f"claim ({label(lora)} control drift within {MAX_DRIFT:.0%}, full FT beyond it): {verdict} "
        f"(LoRA {lora['probe_drift']:+.2%}, full {full['probe_drift']:+.2%}); wall time {results['wall_s']:.0f} s"
    )


def main() -> None:
    """Make the data, train every run, measure before and after, then write the JSON and plots and print a table."""
    args = parse_args()
    started = time.perf_counter()
    budget = QUICK_BUDGET if args.quick else FULL_BUDGET
    work = args.out.resolve() / datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.json or (work / "forgetting.json" if args.quick else REPO / "results" / "forgetting.json")
    env = {**os.environ, "FTUNE_CACHE": str(work / "cache")}  # cold like a fresh clone; keeps ~/.cache clean
    print(f"forgetting study: {budget.steps} steps per run, work directory {work}", flush=True)
    data = make_data(work / "data", budget)
    shared, methods = shared_overrides(data, budget), method_overrides(work)
    for method, overrides in methods.items():
        train(method, overrides, shared, work, env)
    run_dirs = {spec.name: work / spec.name for spec in RUNS}
    rows = evaluate(run_dirs, data, work, env)
    runs = {spec.name: describe_run(spec, run_dirs[spec.name], rows) for spec in RUNS}
    results = {
        "lora": runs[RunSpec("lora", CLAIM_RANK).name],
        "full": runs["full"],
        "sweep": [runs[spec.name] for spec in RUNS if spec.method == "lora"],
        "settings": settings(budget, {**methods, "shared": shared}, args.quick),
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    results["claim_confirmed"] = claim_holds(results["lora"], results["full"])
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot_drift(results, json_path.with_name(f"{json_path.stem}_drift.png"))
    plot_rank(results, json_path.with_name(f"{json_path.stem}_rank.png"))
    print_table(results)
    print(f"wrote {json_path} and its two plots", flush=True)


if __name__ == "__main__":
    main()
