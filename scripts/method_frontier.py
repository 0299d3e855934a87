"""Every fine-tuning method ftune has, on the forgetting study's learning-vs-forgetting frontier.

The lecture notes make claims about methods beyond LoRA: AdaLoRA above LoRA, VeRA with far fewer parameters,
BitFit as a lower bound, EWC and gradual unfreezing against forgetting, NEFTune improving. This study measures
them on ftune's embedded model with the forgetting study's task, data, budget and measurements
(scripts/forgetting_study.py, whose functions it reuses): fine-tuned through the real `ftune train` CLI on
irregular-verb documents, each run reports its task improvement, control drift (regular-verb documents, the
forgetting probe) and benchmark drift (tinyworld_tense), plus what it cost:

  - trainable parameters (summary.json; at the end of the run: AdaLoRA's start rank 12, which it masks down to 8
    per matrix on average, and every block for gradual unfreezing);
  - step time: wall seconds per optimizer step between the first and the last training row of metrics.jsonl, so
    neither the start-up, the first step's warm-up nor the final evaluation counts (the step with its logging and
    the method's own work: AdaLoRA's allocator, EWC's penalty);
  - peak RSS: summary.json's `peak_rss_mb` of the process that trained the point's seeds, one `ftune train -m`
    sweep (the largest over the seeds: later seeds share the process, so theirs include the first's).

Every method is trained at three learning rates with three seeds (150 steps of 8 documents each):

  - full fine-tuning 1e-5, 5e-5, 2e-4; LoRA r 8 (alpha 16, all linear layers), DoRA and LoRA + NEFTune (alpha 5)
    3e-4, 1e-3, 3e-3: the forgetting study's rates, from learning little (there +2.7% for full fine-tuning, +3.0%
    for LoRA r 2 and 16) to over-training (control drift +20%, and +4.4% to +5.2%);
  - EWC (full fine-tuning, ewc.weight 1e6) and gradual unfreezing (a block joins every 20 steps, all six by step
    100) at full fine-tuning's rates, so that their curves cover the same range of task improvement and the
    claims compare them with full fine-tuning at equal improvement, interpolated as the forgetting study does;
  - AdaLoRA, VeRA, LoHa, LoKr, IA3 and prompt tuning at rates chosen from probes: 30 steps, one seed, 32
    held-out documents per split, rates a factor ~3 apart from LoRA's upwards. The lowest rate chosen learns
    visibly less than the middle one, the highest is where the probe's task improvement peaked or control drift
    turned up (a 30-step run learns less than a 150-step one at the same rate, so 150 steps will over-train
    there). Task improvement (control drift) of the probes, LoRA r 8 for reference: +1.9% (-1.7%) at 1e-3,
    +2.7% (-1.2%) at 3e-3:
      AdaLoRA        1e-3 +0.0%, 3e-3 +0.1%, 1e-2 +0.3%, 3e-2 +2.5% (-1.6%), 1e-1 +2.0%  -> 1e-2, 3e-2, 1e-1
      VeRA           3e-3 +0.1%, 1e-2 +0.5%, 3e-2 +1.7%, 1e-1 +2.8% (-0.8%), 3e-1 -3.2% (+9.3%)
                                                                              -> 1e-2, 3e-2, 1e-1
      LoHa           1e-3 +0.4%, 3e-3 +1.3%, 1e-2 +2.9% (-1.4%), 3e-2 +3.6% (+3.6%)  -> 3e-3, 1e-2, 3e-2
      LoKr           1e-3 +0.8%, 3e-3 +1.6%, 1e-2 +2.1% (-1.4%), 3e-2 +2.5% (+0.0%)  -> 3e-3, 1e-2, 3e-2
      IA3            3e-3 +0.5%, 1e-2 +1.2%, 3e-2 +2.0% (-1.5%), 1e-1 +1.8% (-0.6%)  -> 1e-2, 3e-2, 1e-1
      prompt tuning  3e-3 -1.7%, 1e-2 +2.3%, 3e-2 +2.1%, 1e-1 +2.5% (-2.9%), 3e-1 +1.1%
                                                                              -> 3e-3, 3e-2, 3e-1
    The methods that train a few vectors (VeRA, IA3, the prompt) and AdaLoRA learn next to nothing at LoRA's
    rates and need 10-100x larger ones; prompt tuning, whose random virtual tokens first make the task worse,
    changes little between 1e-2 and 1e-1, so its rates span a factor 100.
  - BitFit (3e-4, 1e-3, 3e-3, the BitFit paper's range): the embedded Llama has no biases, so ftune refuses it in
    one line; the study records that line and marks BitFit "not applicable on this model" instead of training.

The claims are judged by small functions from the measured points: which held on this 4.8M-parameter model and
one narrow task, with the numbers, in the JSON and under the table. A difference counts when it exceeds the
seeds' spread (the sum of the two standard deviations).

    python scripts/method_frontier.py           # -> results/method_frontier.json and method_frontier.png
    python scripts/method_frontier.py --quick   # every method at its middle rate, two seeds, four steps

EWC's Fisher information is estimated on the probe text (ftune's `probe.path`), here the control documents its
drift is measured on, so its control drift is measured on the data it was told to protect.
"""

import json
import time
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path

import forgetting_study as study

# Four steps: the warm-up step, AdaLoRA's rank cuts and blocks joining all happen, and a step time has 3 intervals.
QUICK_BUDGET = replace(study.QUICK_BUDGET, steps=4)
FULL_LRS = (1e-5, 5e-5, 2e-4)
LORA_LRS = (3e-4, 1e-3, 3e-3)
EWC_WEIGHT = 1e6  # 30-step probes at 2e-4: task +3.9% drift +2.8% without; 1e6 +2.5% -1.4%; 1e7 +1.7% -0.9%
NEFTUNE_ALPHA = 5  # the NEFTune paper's usual alpha
FAR_FEWER = 10  # "far fewer parameters": an order of magnitude at least
KEEPS_QUALITY = 0.9  # a method with fewer parameters keeps the quality at 90% of the other's task improvement
HOLDS, FAILS, UNTESTABLE = "holds", "does not hold", "untestable here"
NOT_APPLICABLE = "not applicable on this model"
FULL, LORA, ADALORA, VERA, BITFIT, EWC, UNFREEZING, NEFTUNE = (
    "full FT", "LoRA r=8", "AdaLoRA", "VeRA", "BitFit", "EWC", "gradual unfreezing", "NEFTune")


def unfreeze_every(steps: int) -> int:
    """Steps between two blocks joining, so that every block of the embedded model trains a third of the run."""
    blocks = json.loads((study.BASE_MODEL / "config.json").read_text())["num_hidden_layers"]
    return max(1, 2 * steps // (3 * (blocks - 1)))  # the last block trains from the start


def method_curves(budget: study.Budget, quick: bool) -> tuple[study.Curve, ...]:
    """Every method's curve (learning rates: see the module docstring); with `quick`, its middle rate alone."""
    Curve = study.Curve
    curves = (
        Curve(FULL, "tiny_full", FULL_LRS, tag="full"),
        Curve(LORA, "tiny_lora", LORA_LRS, rank=8),
        Curve("DoRA r=8", "tiny_lora", LORA_LRS, rank=8, overrides=("lora.dora=true",), tag="dora_r8"),
        Curve(ADALORA, "tiny_lora", (1e-2, 3e-2, 1e-1), overrides=("method=adalora",), tag="adalora"),
        Curve(VERA, "tiny_lora", (1e-2, 3e-2, 1e-1), overrides=("method=vera",), tag="vera"),
        Curve("LoHa", "tiny_lora", (3e-3, 1e-2, 3e-2), overrides=("method=loha",), tag="loha"),
        Curve("LoKr", "tiny_lora", (3e-3, 1e-2, 3e-2), overrides=("method=lokr",), tag="lokr"),
        Curve("IA3", "tiny_lora", (1e-2, 3e-2, 1e-1), overrides=("method=ia3",), tag="ia3"),
        Curve("prompt tuning", "tiny_lora", (3e-3, 3e-2, 3e-1), overrides=("method=prompt_tuning",), tag="prompt"),
        Curve(BITFIT, "tiny_full", LORA_LRS, overrides=("method=bitfit",), tag="bitfit"),
        Curve(EWC, "tiny_full", FULL_LRS, overrides=(f"ewc.weight={EWC_WEIGHT:g}",), tag="ewc"),
        Curve(UNFREEZING, "tiny_full", FULL_LRS, overrides=(f"method.unfreeze_every={unfreeze_every(budget.steps)}",),
              tag="unfreeze"),
        Curve(NEFTUNE, "tiny_lora", LORA_LRS, rank=8, overrides=(f"trainer.neftune_alpha={NEFTUNE_ALPHA}",),
              tag="neftune_r8"),
    )
    return tuple(replace(curve, lrs=curve.lrs[1:2]) for curve in curves) if quick else curves


def train_curve(curve: study.Curve, data: study.Data, budget: study.Budget, work: Path,
                env: dict[str, str]) -> str | None:
    """Train every point of a curve; ftune's one-line refusal instead where it refuses the method on this model.

    ftune refuses before any weights load and for every learning rate alike, so the first refusal ends the curve.
    """
    for lr, share in curve.points():
        refusal = study.train_point(curve, lr, share, data, budget, work, env, refusal_ok=True)
        if refusal:
            return refusal
    return None


def read_costs(run_dir: Path) -> dict:
    """A run's wall seconds per optimizer step (between its first and last training rows) and its peak RSS."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, *_, last = [row for row in rows if "loss" in row]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"step_s": (last["time"] - first["time"]) / (last["step"] - first["step"]),
            "peak_rss_mb": summary["peak_rss_mb"]}


def describe_point(curve: study.Curve, lr: float, runs: list[dict]) -> dict:
    """The forgetting study's point (settings, seeds, mean and spread), with its step time and peak RSS."""
    return {**study.describe_point(curve, lr, 0.0, runs), "step_s": study.spread([run["step_s"] for run in runs]),
            "peak_rss_mb": max(run["peak_rss_mb"] for run in runs)}


def measure_point(curve: study.Curve, lr: float, work: Path, base: dict, seeds: tuple[int, ...]) -> dict:
    """A trained point read back from its runs' directories: each seed's evaluation and costs, and their spread."""
    runs = []
    for seed in seeds:
        run_dir = work / study.run_name(curve, lr, 0.0, seed)
        runs.append({**study.read_run(run_dir, base), **read_costs(run_dir)})
    return describe_point(curve, lr, runs)


def best_point(points: list[dict], curve: str) -> dict | None:
    """A curve's point with the highest mean task improvement (its best learning rate); None if it never ran."""
    return max((p for p in points if p["curve"] == curve), key=lambda p: p["task_improvement"]["mean"], default=None)


def absent(results: dict, *curves: str) -> str | None:
    """Why one of `curves` has no points (ftune refused it, or the study left it out); None when all ran."""
    for curve in curves:
        if best_point(results["points"], curve) is None:
            return f"{curve}: {results['refused'].get(curve, 'not in this study')}"
    return None


def claim(text: str, verdict: str, evidence: str, **numbers) -> dict:
    """One of the notes' claims, what held here, and the numbers it was judged on."""
    return {"claim": text, "verdict": verdict, "evidence": evidence, **numbers}


def above_at_best_lr(results: dict, text: str, curve: str, reference: str) -> dict:
    """`curve` learns more than `reference` at each one's best learning rate, by more than the seeds' spread."""
    if missing := absent(results, curve, reference):
        return claim(text, UNTESTABLE, missing)
    best, ref = best_point(results["points"], curve), best_point(results["points"], reference)
    gain = best["task_improvement"]["mean"] - ref["task_improvement"]["mean"]
    margin = best["task_improvement"]["std"] + ref["task_improvement"]["std"]
    evidence = (f"best rates: {curve} {study.spread_cell(best['task_improvement'])} (lr {best['lr']:g}, "
                f"{best['trainable_params']:,} weights), {reference} {study.spread_cell(ref['task_improvement'])} "
                f"(lr {ref['lr']:g}, {ref['trainable_params']:,} weights): {100 * gain:+.2f} points, seeds' "
                f"spread {100 * margin:.2f}")
    return claim(text, HOLDS if gain > margin else FAILS, evidence, gain=gain, spread=margin)


def vera_far_fewer(results: dict) -> dict:
    """VeRA trains an order of magnitude fewer weights than LoRA r 8 and keeps 90% of its best task improvement."""
    text = "VeRA with far fewer parameters"
    if missing := absent(results, VERA, LORA):
        return claim(text, UNTESTABLE, missing)
    vera, lora = best_point(results["points"], VERA), best_point(results["points"], LORA)
    if lora["task_improvement"]["mean"] <= 0:
        return claim(text, UNTESTABLE, f"{LORA} did not learn at any rate")
    ratio = lora["trainable_params"] / vera["trainable_params"]
    quality = vera["task_improvement"]["mean"] / lora["task_improvement"]["mean"]
    evidence = (f"{vera['trainable_params']:,} weights against {lora['trainable_params']:,} ({ratio:.1f}x fewer); "
                f"best task improvement {vera['task_improvement']['mean']:+.2%} against "
                f"{lora['task_improvement']['mean']:+.2%} ({quality:.0%} of LoRA's)")
    verdict = HOLDS if ratio >= FAR_FEWER and quality >= KEEPS_QUALITY else FAILS
    return claim(text, verdict, evidence, params_ratio=ratio, quality=quality)


def bitfit_lower_bound(results: dict) -> dict:
    """BitFit learns, and every other method learns at least as much at its best rate (within the seeds' spread)."""
    text = "BitFit as a lower bound"
    if BITFIT in results["refused"]:
        return claim(text, NOT_APPLICABLE, results["refused"][BITFIT])
    if missing := absent(results, BITFIT):
        return claim(text, UNTESTABLE, missing)
    bitfit = best_point(results["points"], BITFIT)
    floor = bitfit["task_improvement"]["mean"] - bitfit["task_improvement"]["std"]
    others = dict.fromkeys(p["curve"] for p in results["points"] if p["curve"] != BITFIT)
    below = [name for name in others if best_point(results["points"], name)["task_improvement"]["mean"] < floor]
    evidence = (f"BitFit {study.spread_cell(bitfit['task_improvement'])} at lr {bitfit['lr']:g} with "
                f"{bitfit['trainable_params']:,} weights; below it at their best: {', '.join(below) or 'none'}")
    return claim(text, HOLDS if bitfit["task_improvement"]["mean"] > 0 and not below else FAILS, evidence)


def less_drift_than_full(results: dict, text: str, curve: str) -> dict:
    """`curve`'s control drift below full fine-tuning's at the same task improvement, by more than its seeds' spread.

    Full fine-tuning's drift is interpolated along its curve (`drift_at`), so only the points of `curve` within its
    range of task improvement are judged.
    """
    if missing := absent(results, curve, FULL):
        return claim(text, UNTESTABLE, missing)
    matched = [(point, full) for point, full in study.matched_drifts(results["points"], curve, FULL)
               if full is not None]
    if not matched:
        return claim(text, UNTESTABLE, f"no {curve} point within {FULL}'s range of task improvement")
    less = [point["control_drift"]["mean"] + point["control_drift"]["std"] < full for point, full in matched]
    evidence = "; ".join(f"lr {point['lr']:g}: task {point['task_improvement']['mean']:+.2%}, drift "
                         f"{study.spread_cell(point['control_drift'])} against {FULL} {full:+.2%}"
                         for point, full in matched)
    verdict = HOLDS if all(less) else FAILS if not any(less) else f"holds at {sum(less)} of {len(less)} points"
    return claim(text, verdict, evidence, full_drift_at_equal_improvement=[full for _, full in matched])


def judge_claims(results: dict) -> list[dict]:
    """Each of the notes' claims, judged on this study's points."""
    return [
        above_at_best_lr(results, "AdaLoRA above LoRA", ADALORA, LORA),
        vera_far_fewer(results),
        bitfit_lower_bound(results),
        less_drift_than_full(results, "EWC reduces forgetting", EWC),
        less_drift_than_full(results, "gradual unfreezing reduces forgetting", UNFREEZING),
        above_at_best_lr(results, "NEFTune improves", NEFTUNE, LORA),
    ]


COLUMNS = ("method", "lr", "trainable", "task improvement", "control drift", "benchmark drift", "step (ms)",
           "peak RSS (MB)")


def table_rows(results: dict) -> list[list[str]]:
    """One row per point (mean ± std over seeds), in the curves' order; one row per method ftune refused."""
    rows = []
    for curve in results["settings"]["curves"]:
        name = curve["name"]
        if name in results["refused"]:
            rows.append([name, "", "", NOT_APPLICABLE, "", "", "", ""])
        for p in (p for p in results["points"] if p["curve"] == name):
            rows.append([name, f"{p['lr']:g}", f"{p['trainable_params']:,}",
                         *(study.spread_cell(p[k]) for k in ("task_improvement", "control_drift", "benchmark_drift")),
                         f"{1000 * p['step_s']['mean']:.0f} ± {1000 * p['step_s']['std']:.0f}",
                         f"{p['peak_rss_mb']:,.0f}"])
    return rows


def print_table(results: dict) -> None:
    """The table, the refusals and the claims with their verdicts."""
    console = study.print_rich_table("method frontier (task: irregular verbs; control: regular verbs)", COLUMNS,
                                     table_rows(results))
    lines = [f"{name}: {NOT_APPLICABLE}: {reason}" for name, reason in results["refused"].items()]
    lines += [f"{c['claim']}: {c['verdict']} ({c['evidence']})" for c in results["claims"]]
    for line in [*lines, f"wall time {results['wall_s']:.0f} s on {results['machine']['cpu']}"]:
        console.print(line, markup=False, highlight=False)  # ftune's lines hold regexes such as [.]


def plot_frontier(results: dict, path: Path) -> None:
    """Task improvement against control drift, and trainable parameters (log) against task improvement."""
    plt = study.pyplot()
    colors = plt.cycler(color=[*plt.get_cmap("tab10").colors, *plt.get_cmap("Dark2").colors])
    with plt.rc_context({"axes.prop_cycle": colors}):  # a color per method: matplotlib's ten would repeat
        draw_methods(results, path)


def diverged(point: dict) -> bool:
    """A point whose training left the task worse than the base: past the frontier, over-trained at too high a rate.

    Such a point is in the table and the JSON, but a run that fell apart (AdaLoRA at 0.1: -211%, with +308% control
    drift) would set the plot's scale and squeeze every other method into a corner, so the plot lists it instead.
    """
    return point["task_improvement"]["mean"] < 0


def draw_methods(results: dict, path: Path) -> None:
    """`plot_frontier`'s two panels, drawn with the colors in effect; refused methods and diverged points noted."""
    plt = study.pyplot()
    fig, (drift_ax, params_ax) = plt.subplots(1, 2, figsize=(15, 6), dpi=110)
    markers = "os^Dv<>phX*P"
    shown = [p for p in results["points"] if not diverged(p)]
    study.draw_curves(drift_ax, shown, "control_drift", lambda p: f"{p['lr']:g}", markers)
    for index, (name, points) in enumerate(study.curves_of(shown).items()):
        params_ax.errorbar([p["trainable_params"] for p in points],
                           [100 * p["task_improvement"]["mean"] for p in points],
                           yerr=[100 * p["task_improvement"]["std"] for p in points], linestyle="none",
                           marker=markers[index % len(markers)], capsize=3, color=f"C{index}", label=name)
    drift_ax.set(title="Learning vs forgetting (labels: learning rate)",
                 xlabel="task improvement (% lower held-out perplexity)", ylabel="control perplexity drift (%)")
    params_ax.set(title="Task improvement against trainable parameters (each learning rate)", xscale="log",
                  xlabel="trainable parameters", ylabel="task improvement (% lower held-out perplexity)")
    notes = [f"{name}: {NOT_APPLICABLE}" for name in results["refused"]]
    notes += [f"off the plot, diverged: {p['curve']} lr {p['lr']:g} (task {p['task_improvement']['mean']:+.0%}, "
              f"drift {p['control_drift']['mean']:+.0%})" for p in results["points"] if diverged(p)]
    for row, note in enumerate(notes):
        params_ax.annotate(note, (0.01, 0.01 + 0.04 * row), xycoords="axes fraction", fontsize=8)
    drift_ax.axhline(0.0, color="grey", linewidth=0.8)
    for ax in (drift_ax, params_ax):
        ax.grid(alpha=0.3)
    drift_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    study.save_figure(fig, path)


def main() -> None:
    """Make the data, train every method's points with every seed, measure, judge the claims, write and print."""
    args = study.parse_args(__doc__, "method_frontier", "method_frontier.json")
    started = time.perf_counter()
    budget = QUICK_BUDGET if args.quick else study.FULL_BUDGET
    curves = method_curves(budget, args.quick)
    work, json_path, env = study.workspace(args, "method_frontier.json")
    print(f"method frontier: {len(curves)} methods, {budget.steps} steps per run, {len(budget.seeds)} seeds, "
          f"work directory {work}", flush=True)
    data = study.make_data(work / "data", budget)
    base = study.evaluate_base(data, budget, work, env)
    refused = {curve.name: reason for curve in curves if (reason := train_curve(curve, data, budget, work, env))}
    points = [measure_point(curve, lr, work, base, budget.seeds)
              for curve in curves if curve.name not in refused for lr in curve.lrs]
    results = {
        "base": base, "points": points, "refused": refused,
        "settings": {"quick": args.quick, **asdict(budget), "train_documents": budget.train_documents,
                     "micro_batch_size": study.MICRO_BATCH, "benchmark": study.BENCHMARK,
                     "curves": [asdict(curve) for curve in curves], "shared": study.shared_overrides(data, budget),
                     "data_seeds": {"train": study.TRAIN_SEED, "task": study.TASK_SEED,
                                    "control": study.CONTROL_SEED},
                     "ftune_commit": study.ftune_commit()},
        "machine": study.machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    results["claims"] = judge_claims(results)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot_frontier(results, json_path.with_suffix(".png"))
    print_table(results)
    print(f"wrote {json_path} and its plot", flush=True)


if __name__ == "__main__":
    main()
