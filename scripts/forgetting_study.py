"""Does LoRA forget less than full fine-tuning at equal learning? A learning-vs-forgetting frontier on ftune's model.

The claim under test: fine-tuned with LoRA on a narrow task, a model keeps its perplexity on unrelated text
within 5% of the base model's, while full fine-tuning drifts visibly, *at equal task improvement*. One learning
rate per method cannot answer that (a lower rate forgets less and learns less), so each method is swept over
learning rates and every point is trained with several seeds:

  - full fine-tuning at 1e-6, 1e-5 and 5e-5 (the range the lecture notes give, 1e-6 to 5e-5) and 2e-4 (above it);
  - LoRA (alpha 16, all linear layers) at ranks 2 and 16, each at 3e-4, 1e-3 and 3e-3;
  - replay: full fine-tuning at 2e-4 with 10% and 30% of the training examples drawn from general text
    (`data.mix`), the lecture notes' exercise; 0% is the full fine-tuning point itself.

Each point becomes (task improvement, control drift), mean and standard deviation over the seeds, and the result
is a frontier plot: one curve per method, x the task improvement, y the control drift, with error bars.

The embedded model (ftune/assets/models/tiny) was pretrained on tinyworld documents that use every verb. Here it
is fine-tuned, through the real `ftune train` CLI, on documents whose verbs are all IRREGULAR (the narrow task);
each run evaluates, at its last step, held-out documents of two kinds and a benchmark:
  - task: held-out irregular-verb documents (`data.eval_path`): task improvement = 1 - ppl after / ppl before;
  - control: held-out REGULAR-verb documents, ftune's forgetting probe (`probe.path`): drift = ppl after /
    ppl before - 1;
  - benchmark: the shipped lm-eval task tinyworld_tense (`probe.tasks`), whose drift is the share of the base
    model's accuracy lost.
The base model's task perplexity comes from one `ftune eval` with the runs' precision (bf16 autocast).

    python scripts/forgetting_study.py            # -> results/forgetting.json and forgetting_frontier.png
    python scripts/forgetting_study.py --quick    # one point per curve, two seeds, a few steps: a smoke test

Data seeds are disjoint from those of pretraining (1, evaluation 2; scripts/build_tiny_model.py), of the shipped
datasets (3-6; scripts/build_datasets.py) and of the training seeds below. Training runs, data and ftune's cache
go under --out (git-ignored runs/ by default); only the JSON and the plot are meant to be kept.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import tinyworld as world

from ftune.errors import EXIT_BAD_INPUT

REPO = Path(__file__).resolve().parents[1]
BASE_MODEL = REPO / "ftune" / "assets" / "models" / "tiny"
TRAIN_SEED, TASK_SEED, CONTROL_SEED, GENERAL_SEED = 11, 12, 13, 14
MICRO_BATCH = 8  # the tiny trainer's micro-batch, for every run
MAX_DRIFT = 0.05  # the claim: LoRA's control perplexity stays within 5% of the base model's
BENCHMARK = "tinyworld_tense"
DRIFT_KEY, SCORE_KEY = f"{BENCHMARK}_drift", f"{BENCHMARK}_score"
VERDICTS = {True: "holds", False: "does not hold", None: "untestable (no LoRA point within full FT's range)"}


@dataclass(frozen=True)
class Budget:
    """Steps per run, held-out documents per split, benchmark items per evaluation, and the training seeds."""

    steps: int
    eval_documents: int
    benchmark_items: int
    seeds: tuple[int, ...]

    @property
    def train_documents(self) -> int:
        """Exactly one pass without replay: every step sees fresh documents, as in pretraining."""
        return self.steps * MICRO_BATCH


@dataclass(frozen=True)
class Curve:
    """One curve of the frontier: a method's runs, one point per learning rate (or replay share)."""

    name: str
    recipe: str
    lrs: tuple[float, ...]
    rank: int | None = None
    replay: tuple[float, ...] = (0.0,)
    overrides: tuple[str, ...] = ()
    """Further `ftune train` overrides that make the method (e.g. `method=vera`, `ewc.weight=1e6`)."""
    tag: str | None = None
    """Run directories' prefix (default: `lora_r<rank>`, or `full`)."""

    def points(self) -> list[tuple[float, float]]:
        """(learning rate, replay share) of each point, in the curve's order."""
        return [(lr, share) for lr in self.lrs for share in self.replay]


FULL_BUDGET = Budget(steps=150, eval_documents=100, benchmark_items=40, seeds=(1, 2, 3))
QUICK_BUDGET = Budget(steps=6, eval_documents=16, benchmark_items=8, seeds=(1, 2))
FULL_CURVES = (
    Curve("full FT", "tiny_full", (1e-6, 1e-5, 5e-5, 2e-4)),
    Curve("LoRA r=2", "tiny_lora", (3e-4, 1e-3, 3e-3), rank=2),
    Curve("LoRA r=16", "tiny_lora", (3e-4, 1e-3, 3e-3), rank=16),
    Curve("full FT + replay", "tiny_full", (2e-4,), replay=(0.0, 0.1, 0.3)),
)
QUICK_CURVES = (
    Curve("full FT", "tiny_full", (2e-4,)),
    Curve("LoRA r=2", "tiny_lora", (1e-3,), rank=2),
    Curve("full FT + replay", "tiny_full", (2e-4,), replay=(0.3,)),
)


@dataclass(frozen=True)
class Data:
    """The JSONL files of the study."""

    train: Path
    task: Path
    control: Path
    general: Path


def parse_args(description: str = __doc__, study: str = "forgetting_study",
               results: str = "forgetting.json") -> argparse.Namespace:
    """Read the command line of a study (this one, or a sibling script's named `study`, writing `results`)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="results file; the plot goes next to it "
                        f"(default: results/{results}, or the work directory with --quick)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / study,
                        help="parent of this study's work directory (data, runs, cache)")
    parser.add_argument("--quick", action="store_true", help="tiny budget, to check that everything runs")
    return parser.parse_args()


def write_jsonl(path: Path, texts: list[str]) -> Path:
    """Write `{"text": ...}` records, the format ftune trains on and probes with."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def make_data(data_dir: Path, budget: Budget) -> Data:
    """Irregular-verb training and task documents, regular-verb control documents, all-verb general text."""
    documents = budget.train_documents
    return Data(
        train=write_jsonl(data_dir / "train.jsonl", world.generate_documents(documents, TRAIN_SEED, "irregular")),
        task=write_jsonl(data_dir / "task.jsonl",
                         world.generate_documents(budget.eval_documents, TASK_SEED, "irregular")),
        control=write_jsonl(data_dir / "control.jsonl",
                            world.generate_documents(budget.eval_documents, CONTROL_SEED, "regular")),
        general=write_jsonl(data_dir / "general.jsonl", world.generate_documents(documents, GENERAL_SEED)),
    )


def run_ftune(args: list[str], log: Path, env: dict[str, str], refusal_ok: bool = False) -> str | None:
    """Run an ftune command in its own process (as a user would), its output to `log`; stop on failure.

    With `refusal_ok`, a command ftune refuses as bad input (exit 2, e.g. BitFit on a model without biases) returns
    ftune's one-line error instead, for a study that records which methods do not apply; None when it ran.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as handle:
        code = subprocess.run([sys.executable, "-m", "ftune", *args], cwd=REPO, env=env, stdout=handle,
                              stderr=subprocess.STDOUT, check=False).returncode
    lines = log.read_text().splitlines()
    if refusal_ok and code == EXIT_BAD_INPUT:
        return next(line for line in reversed(lines) if line.startswith("ftune: error: "))
    if code != 0:
        tail = "\n".join(lines[-20:])
        sys.exit(f"ftune {args[0]} failed (exit code {code}), see {log}:\n{tail}")
    return None


def shared_overrides(data: Data, budget: Budget) -> list[str]:
    """The `ftune train` settings of every run: same data, steps, batch and evaluation; last weights in final/."""
    return [
        f"data.eval_path={data.task}",
        "data.format=text",
        f"probe.path={data.control}",
        f"probe.tasks=[{BENCHMARK}]",
        f"probe.limit={budget.benchmark_items}",
        f"trainer.max_steps={budget.steps}",
        "trainer.eval_every=0",  # evaluate once, after the last step
        f"trainer.micro_batch_size={MICRO_BATCH}",
        "trainer.grad_accum=1",
        "trainer.save_every=0",
        "trainer.final_weights=last",
    ]


def run_name(curve: Curve, lr: float, share: float, seed: int) -> str:
    """A run's directory name: what sets it apart."""
    method = curve.tag or (f"lora_r{curve.rank}" if curve.rank else "full")
    replay = f"_replay{round(100 * share)}" if share else ""
    return f"{method}{replay}_lr{lr:g}_s{seed}"


def data_overrides(data: Data, share: float) -> list[str]:
    """Training data: the task documents alone, or mixed with general text at `share` of the examples."""
    if not share:
        return [f"data.path={data.train}"]
    return [f"data.mix=[{{path: {data.train}, weight: {1 - share:g}}},{{path: {data.general}, weight: {share:g}}}]"]


def train_point(curve: Curve, lr: float, share: float, data: Data, budget: Budget, work: Path,
                env: dict[str, str], refusal_ok: bool = False) -> str | None:
    """Train one point of a curve, every seed, with one `ftune train -m` sweep (one start-up for all seeds).

    Returns ftune's one-line refusal where `refusal_ok` and ftune refuses the curve's method (see `run_ftune`).
    """
    seeds = ",".join(str(seed) for seed in budget.seeds)
    name = run_name(curve, lr, share, 0).removesuffix("_s0")
    rank = [f"lora.r={curve.rank}"] if curve.rank else []
    args = ["train", "-m", f"recipe={curve.recipe}", *curve.overrides, f"optim.lr={lr:g}", *rank, f"seed={seeds}",
            f"output_dir={work / name}_s${{seed}}", *data_overrides(data, share), *shared_overrides(data, budget)]
    started = time.perf_counter()
    refusal = run_ftune(args, work / "logs" / f"train_{name}.log", env, refusal_ok)
    print(f"  {name}: {refusal or f'{time.perf_counter() - started:.0f} s'}", flush=True)
    return refusal


def evaluate_base(data: Data, budget: Budget, work: Path, env: dict[str, str]) -> dict:
    """The base model's task and control perplexity and benchmark score, measured as the runs measure theirs."""
    out = work / "base_eval.json"
    run_ftune(["eval", f"model={BASE_MODEL}", f"data.eval_path={data.task}", "data.format=text",
               f"probe.path={data.control}", f"tasks=[{BENCHMARK}]", f"limit={budget.benchmark_items}",
               "mixed_precision=bf16", "generate=0", f"batch_size={MICRO_BATCH}", f"out={out}"],
              work / "logs" / "eval_base.log", env)
    (row,) = json.loads(out.read_text()).values()
    return {"task_ppl": row["eval_ppl"], "control_ppl": row["probe_ppl"],
            "benchmark_acc": row[f"{BENCHMARK}/acc"]}


def read_run(run_dir: Path, base: dict) -> dict:
    """One run's final evaluation (its last metrics row with an evaluation) as the study's three numbers."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = [row for row in rows if "eval_ppl" in row][-1]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "task_ppl": final["eval_ppl"],
        "task_improvement": 1.0 - final["eval_ppl"] / base["task_ppl"],
        "control_drift": final["probe_drift"],
        "benchmark_acc": final[SCORE_KEY],
        "benchmark_drift": final[DRIFT_KEY],
        "trainable_params": summary["trainable_params"],
        "train_wall_s": summary["wall_time_s"],
    }


def spread(values: list[float]) -> dict:
    """Mean and sample standard deviation (0 for a single value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def describe_point(curve: Curve, lr: float, share: float, runs: list[dict]) -> dict:
    """A point of a curve: its settings, each seed's numbers, and their mean and spread."""
    keys = ("task_improvement", "control_drift", "benchmark_drift", "task_ppl")
    return {"curve": curve.name, "lr": lr, "rank": curve.rank, "replay": share, "seeds": runs,
            "trainable_params": runs[0]["trainable_params"],
            **{key: spread([run[key] for run in runs]) for key in keys}}


def drift_at(curve_points: list[dict], improvement: float) -> float | None:
    """A curve's control drift at `improvement`, linear between its points; None outside its range."""
    ordered = sorted(curve_points, key=lambda p: p["task_improvement"]["mean"])
    for low, high in zip(ordered, ordered[1:], strict=False):
        x0, x1 = low["task_improvement"]["mean"], high["task_improvement"]["mean"]
        if x0 <= improvement <= x1 and x1 > x0:
            y0, y1 = low["control_drift"]["mean"], high["control_drift"]["mean"]
            return y0 + (y1 - y0) * (improvement - x0) / (x1 - x0)
    return None


def matched_drifts(points: list[dict], compared: str, reference: str) -> list[tuple[dict, float | None]]:
    """Each point of the curves named `compared...`, with the `reference` curve's drift at its task improvement."""
    reference_points = [p for p in points if p["curve"] == reference]
    return [(point, drift_at(reference_points, point["task_improvement"]["mean"]))
            for point in points if point["curve"].startswith(compared)]


def equal_improvement(points: list[dict]) -> list[dict]:
    """For every LoRA point: full fine-tuning's control drift at the same task improvement (interpolated)."""
    return [{"curve": point["curve"], "lr": point["lr"], "task_improvement": point["task_improvement"]["mean"],
             "lora_drift": point["control_drift"]["mean"], "lora_drift_std": point["control_drift"]["std"],
             "full_drift": full_drift}
            for point, full_drift in matched_drifts(points, "LoRA", "full FT")]


def claim_holds(comparisons: list[dict]) -> bool | None:
    """LoRA within MAX_DRIFT and full FT beyond it, wherever both reach the same improvement; None if nowhere."""
    matched = [c for c in comparisons if c["full_drift"] is not None]
    if not matched:
        return None
    return all(abs(c["lora_drift"]) <= MAX_DRIFT < c["full_drift"] for c in matched)


def pyplot():
    """Pyplot on the Agg backend, drawing straight to files (no display), as ftune.report.plots does."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def curves_of(points: list[dict]) -> dict[str, list[dict]]:
    """The points grouped by curve, curves in the order they first appear."""
    curves: dict[str, list[dict]] = {}
    for point in points:
        curves.setdefault(point["curve"], []).append(point)
    return curves


def draw_curves(ax, points: list[dict], key: str, label: Callable[[dict], str], markers: str = "o") -> None:
    """Task improvement (x) against `key` (y) in percent, one curve per method with error bars, points labelled."""
    for index, (name, curve) in enumerate(curves_of(points).items()):
        x = [100 * p["task_improvement"]["mean"] for p in curve]
        y = [100 * p[key]["mean"] for p in curve]
        ax.errorbar(x, y, xerr=[100 * p["task_improvement"]["std"] for p in curve],
                    yerr=[100 * p[key]["std"] for p in curve], marker=markers[index % len(markers)], capsize=3,
                    color=f"C{index}", label=name)
        for point, xi, yi in zip(curve, x, y, strict=True):
            ax.annotate(label(point), (xi, yi), fontsize=7, textcoords="offset points", xytext=(4, 4))


def save_figure(fig, path: Path) -> None:
    """Write the figure through a temporary file (a reader never sees half a PNG) and free it."""
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    pyplot().close(fig)
    tmp.replace(path)


def plot_frontier(results: dict, path: Path) -> None:
    """Task improvement against control drift and against benchmark drift, one curve per method, error bars."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), dpi=110)
    for ax, key in zip(axes, ("control_drift", "benchmark_drift"), strict=True):
        draw_curves(ax, results["points"], key,
                    lambda p: f"{p['replay']:.0%}" if p["curve"].endswith("replay") else f"{p['lr']:g}")
    axes[0].axhline(100 * MAX_DRIFT, color="red", linewidth=0.8, linestyle="--", label=f"claim: {MAX_DRIFT:.0%}")
    axes[0].set(title="Learning vs forgetting (labels: learning rate, or replay share)",
                xlabel="task improvement (% lower held-out perplexity)", ylabel="control perplexity drift (%)")
    axes[1].set(title=f"Benchmark drift ({BENCHMARK}, share of base accuracy lost)",
                xlabel="task improvement (% lower held-out perplexity)", ylabel="accuracy lost (%)")
    for ax in axes:
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def spread_cell(stat: dict) -> str:
    """A mean ± std share as a table shows it: signed percent."""
    return f"{stat['mean']:+.2%} ± {stat['std']:.2%}"


def print_rich_table(title: str, columns: tuple[str, ...], rows: list[list[str]]):
    """Print a table, its first column left-aligned and the numbers right; returns the console for what follows.

    The console is 140 columns wide at least, so that rows stay on one line in a log.
    """
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, justify="right" if table.columns else "left")
    for row in rows:
        table.add_row(*row)
    console = Console(width=max(140, Console().width))
    console.print(table)
    return console


def print_table(results: dict) -> None:
    """The numbers of the study, one row per point (mean ± std over seeds), and the verdict."""
    rows = [[p["curve"], f"{p['lr']:g}", f"{p['replay']:.0%}", f"{p['trainable_params']:,}",
             *(spread_cell(p[k]) for k in ("task_improvement", "control_drift", "benchmark_drift"))]
            for p in results["points"]]
    console = print_rich_table("forgetting study (task: irregular verbs; control: regular verbs)",
                               ("curve", "lr", "replay", "trainable", "task improvement", "control drift",
                                "benchmark drift"), rows)
    for c in results["equal_improvement"]:
        full = "outside full FT's range" if c["full_drift"] is None else f"full FT {c['full_drift']:+.2%}"
        console.print(f"{c['curve']} lr {c['lr']:g}: task {c['task_improvement']:+.2%}, control drift "
                      f"{c['lora_drift']:+.2%} ± {c['lora_drift_std']:.2%}; at the same improvement: {full}")
    console.print(f"claim (LoRA within {MAX_DRIFT:.0%}, full FT beyond, at equal task improvement): "
                  f"{VERDICTS[results['claim_holds']]}; wall time {results['wall_s']:.0f} s")


def ftune_commit() -> str:
    """The checkout's commit ("-dirty" with uncommitted changes): the numbers depend on ftune's code and recipes."""
    describe = ["git", "describe", "--always", "--dirty"]
    return subprocess.run(describe, cwd=REPO, capture_output=True, text=True, check=False).stdout.strip() or "unknown"


def machine() -> dict:
    """Where the study ran: its timings mean little without the CPU and thread count."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in (cpuinfo.read_text().splitlines() if cpuinfo.is_file() else [])
             if line.startswith("model name")]
    return {"cpu": names[0] if names else platform.processor(), "cores": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "platform": platform.platform(),
            "python": platform.python_version(),
            **{package: version(package) for package in ("torch", "transformers", "peft", "accelerate", "lm_eval")}}


def workspace(args: argparse.Namespace, results: str) -> tuple[Path, Path, dict[str, str]]:
    """A new work directory under --out, the results file, and the environment of the study's ftune commands.

    The results go to results/ (the work directory with --quick); the commands run offline, with ftune's cache
    inside the work directory.
    """
    work = args.out.resolve() / datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path = args.json or (work / results if args.quick else REPO / "results" / results)
    env = {**os.environ, "FTUNE_CACHE": str(work / "cache"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return work, json_path, env


def main() -> None:
    """Make the data, train every point with every seed, measure, then write the JSON and plot and print a table."""
    args = parse_args()
    started = time.perf_counter()
    budget, curves = (QUICK_BUDGET, QUICK_CURVES) if args.quick else (FULL_BUDGET, FULL_CURVES)
    work, json_path, env = workspace(args, "forgetting.json")
    print(f"forgetting study: {budget.steps} steps per run, {len(budget.seeds)} seeds, work directory {work}",
          flush=True)
    data = make_data(work / "data", budget)
    base = evaluate_base(data, budget, work, env)
    trained = set()
    for curve in curves:
        for lr, share in curve.points():
            if run_name(curve, lr, share, 0) not in trained:  # replay 0% is the full FT point, trained once
                train_point(curve, lr, share, data, budget, work, env)
                trained.add(run_name(curve, lr, share, 0))
    points = [describe_point(curve, lr, share,
                             [read_run(work / run_name(curve, lr, share, seed), base) for seed in budget.seeds])
              for curve in curves for lr, share in curve.points()]
    comparisons = equal_improvement(points)
    results = {
        "base": base, "points": points, "equal_improvement": comparisons, "claim_holds": claim_holds(comparisons),
        "settings": {"quick": args.quick, **asdict(budget), "train_documents": budget.train_documents,
                     "micro_batch_size": MICRO_BATCH, "max_drift": MAX_DRIFT, "benchmark": BENCHMARK,
                     "curves": [asdict(curve) for curve in curves], "shared": shared_overrides(data, budget),
                     "data_seeds": {"train": TRAIN_SEED, "task": TASK_SEED, "control": CONTROL_SEED,
                                    "general": GENERAL_SEED},
                     "ftune_commit": ftune_commit()},
        "machine": machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot_frontier(results, json_path.with_name(f"{json_path.stem}_frontier.png"))
    print_table(results)
    print(f"wrote {json_path} and its plot", flush=True)


if __name__ == "__main__":
    main()
