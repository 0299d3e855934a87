"""The training loop: one loop for every method (LoRA, QLoRA, full) and objective, readable top to bottom.

Each optimizer step, in order: take the step's micro-batches -> forward and backward each -> clip -> read
the step's figures from the device (once) -> guard against a non-finite loss -> step, the method's own step
(`ftune.train.method_steps`), schedule, zero -> log
-> evaluate (the objective's metrics, forgetting probe, early stopping) -> sample answers -> checkpoint -> stop
check. What is learned (the loss, what it is divided by, what is logged and evaluated) is the objective's
(`ftune.train.objectives`), which the loop names none of. accelerate only places tensors, autocasts and
synchronises gradients. The probe is `ftune.eval`'s, the function `ftune eval` runs.
"""

import itertools
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from ftune.config.schema import EarlyStopCfg, ProbeCfg, TrainerCfg
from ftune.errors import GuardStop, StepError
from ftune.eval.generation import Sampler
from ftune.eval.loss import learned_token_count
from ftune.eval.probe import probe_ppl
from ftune.eval.tasks import TaskProbe
from ftune.model.instrument import Change
from ftune.model.moe import add_router_loss
from ftune.report.console import TrainProgress, print_table
from ftune.report.metrics import MetricsLog, NullLog
from ftune.train.checkpoint import best_checkpoint, save_checkpoint
from ftune.train.early_stop import judge
from ftune.train.interrupt import StopSignals
from ftune.train.method_steps import MethodStep
from ftune.train.objectives import Objective
from ftune.train.state import TrainState


@dataclass(kw_only=True)
class TrainRun:
    """What the loop is handed: prepared model, optimizer, schedule and data, and where to report."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    train_loader: DataLoader
    """A prepared DataLoader, or with `data.streaming` a `ftune.data.stream.StreamLoader`."""
    eval_loader: DataLoader | None
    probe_loader: DataLoader | None
    trainer: TrainerCfg
    early_stop: EarlyStopCfg
    probe: ProbeCfg
    max_grad_norm: float
    total_steps: int
    run_dir: Path
    log: MetricsLog | NullLog
    state: TrainState
    objective: Objective
    """What the run learns from: the micro-batch's loss, what the step divides it by, its metrics, its evaluation."""
    task_probe: TaskProbe | None = None
    """lm-eval tasks scored at each evaluation against the base (`probe.tasks`), or None."""
    sampler: Sampler | None = None
    """Greedy answers to fixed held-out prompts every `trainer.sample_every` steps, or None."""
    on_checkpoint: Callable[[], None] | None = None
    """Called on the main process after each checkpoint (e.g. to redraw plots)."""
    changes: list[Change] = field(default_factory=list)
    """What ftune put on the model and the process (`ftune.model.instrument`): the start table and summary.json."""
    penalties: list[Callable[[], torch.Tensor]] = field(default_factory=list)
    """Terms of the weights alone added to every step's loss once, each logged under its `name` (`ewc_loss`)."""
    method_steps: list[MethodStep] = field(default_factory=list)
    """What the method does after each optimizer step (AdaLoRA's rank allocation, gradual unfreezing)."""


def fit(run: TrainRun) -> tuple[str, int]:
    """Train until a stop condition; returns (stop reason, exit code)."""
    state, trainer = run.state, run.trainer
    epochs = None if trainer.max_steps > 0 else trainer.epochs
    clock = Throughput(state)
    progress_bar = TrainProgress(run.total_steps, start=state.step, enabled=run.accelerator.is_main_process)
    for method_step in run.method_steps:
        method_step.start(state.step)
    if trainer.eval_on_start and state.step == 0:
        evaluate(run, judged=False)
        sample(run)
    with progress_bar as progress, StopSignals() as signals:
        for batches in step_batches(run, epochs):
            sums, counts = forward_backward_or_checkpoint(run, batches)
            lr = run.scheduler.get_last_lr()[0]  # the rate this step uses (the scheduler moves on in the step)
            grad_norm = clip_gradients(run)
            values = to_host(sums | counts | {"grad_norm": grad_norm})
            guard_finite(run, values["loss"])
            method_figures = optimizer_step(run)
            state.advance(tokens=int(values["tokens"]), learned_tokens=int(values["learned"]))
            last = state.step >= run.total_steps
            metrics = run.objective.summarize({k: values[k] for k in sums}, values["count"]) | method_figures
            row = log_step(run, metrics, lr, values["grad_norm"], clock) if due(state.step, trainer.log_every) or last \
                else None
            progress.update(state.step, row)
            verdict = evaluate(run) if due(state.step, trainer.eval_every) or last else None
            if trainer.sample_every and (due(state.step, trainer.sample_every) or last):
                sample(run)
            keep_best = verdict and verdict.improved and trainer.final_weights == "best"  # final/ will reload it
            if due(state.step, trainer.save_every) or keep_best or signals.requested(run.accelerator):
                checkpoint(run)
            if signals.signum is not None:
                return "interrupted", signals.exit_code()
            if verdict and verdict.stop_reason:
                return verdict.stop_reason, 0
            if last:
                break
    return ("max_steps" if epochs is None else "epochs"), 0


def step_batches(run: TrainRun, epochs: int | None):
    """Yield the micro-batches of each optimizer step, epoch after epoch, from where `run.state` left off.

    A step never spans two epochs: the last one of an epoch may have fewer micro-batches, which normalising by
    the whole step's count (tokens or pairs) handles exactly. `run.state` tracks the position for exact resume. A stream
    (`data.streaming`) never ends, so its epoch stays 0 and `batch_in_epoch` counts every micro-batch taken.
    """
    state, loader = run.state, run.train_loader
    while epochs is None or state.epoch < epochs:
        loader.set_epoch(state.epoch)  # the seedable sampler shuffles by (seed, epoch)
        batches = iter(resume_within_epoch(run.accelerator, loader, state.batch_in_epoch))
        while group := list(itertools.islice(batches, run.trainer.grad_accum)):
            state.batch_in_epoch += len(group)
            yield group
        state.epoch += 1
        state.batch_in_epoch = 0


def resume_within_epoch(acc: Accelerator, loader, taken: int):
    """The loader from micro-batch `taken` of the epoch on.

    accelerate skips a DataLoader's sampled indices; a stream has none to skip, so it replays its rows and
    drops the ones already trained on itself (`skip_first_batches` of `ftune.data.stream.StreamLoader`).
    """
    if not taken:
        return loader
    if hasattr(loader, "skip_first_batches"):
        return loader.skip_first_batches(taken)
    return acc.skip_first_batches(loader, taken)


def forward_backward(run: TrainRun, batches: list[dict]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Accumulate the step's gradient as (sum of the objective's losses) / (its count over the step on all ranks).

    The objective's loss is a sum over its units (learned tokens for SFT, pairs for DPO); normalising by the whole
    step's count, not per micro-batch, makes micro-batch 2 x accumulation 4 give the gradient of batch 8. DDP
    averages gradients over ranks, so each rank's loss is scaled by the number of processes to turn that average
    back into a sum (accelerate's documented recipe). We use `no_sync` rather than `accelerator.accumulate`
    because a step's micro-batch count varies at epoch ends.

    Returns:
        The summed loss terms, and the counts (`count`: the objective's units, `learned` tokens, real `tokens`),
        each over all ranks, as tensors.
    """
    acc, model, objective = run.accelerator, run.model, run.objective
    batches = objective.prepare_step(model, batches, run.state.step + 1)
    counts = acc.reduce(torch.stack([
        torch.stack([objective.count(b), learned_token_count(b["labels"]), b["num_tokens"]]) for b in batches
    ]).sum(0), "sum")
    scale = acc.num_processes / counts[0].clamp(min=1)
    sums: dict[str, torch.Tensor] = {}
    for index, batch in enumerate(batches):
        last = index == len(batches) - 1
        with nullcontext() if last else acc.no_sync(model):
            parts = objective.loss(model, batch)
            parts = add_router_loss(acc.unwrap_model(model), batch, parts,  # MoE only (model/moe.py)
                                    objective.count(batch))
            if index == 0:  # the weights' own terms, computed once per step (each costs a pass over the weights)
                parts = add_penalties(run.penalties, parts, counts[0] / acc.num_processes)
            acc.backward(parts["loss"] * scale)
        for key, value in parts.items():
            sums[key] = sums.get(key, 0) + value.detach()
    return {k: acc.reduce(v, "sum") for k, v in sums.items()}, dict(zip(("count", "learned", "tokens"), counts,
                                                                         strict=True))


def add_penalties(penalties: list[Callable[[], torch.Tensor]], parts: dict[str, torch.Tensor], weight: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
    """Each penalty times `weight`, added to the summed loss and kept under the penalty's name.

    `forward_backward` adds them to a step's first micro-batch with weight = the step's count over the processes:
    the step divides its sums by that count and each process's gradient is scaled by the number of processes,
    which DDP's average undoes, so each penalty enters the step's gradient (and its logged mean) once, whatever the
    accumulation.
    """
    for penalty in penalties:
        term = penalty() * weight
        parts = {**parts, "loss": parts["loss"] + term, penalty.name: term}
    return parts


def forward_backward_or_checkpoint(run: TrainRun, batches: list[dict]):
    """`forward_backward`, or on failing user code (`StepError`) a checkpoint of the state before this step.

    The step's batches are not counted as taken, so the run resumes there once the code is fixed.

    On one process only: the others would wait for the failed one at the checkpoint's barrier.
    """
    try:
        return forward_backward(run, batches)
    except StepError:
        if run.accelerator.num_processes == 1:
            run.optimizer.zero_grad(set_to_none=True)
            run.state.batch_in_epoch -= len(batches)
            checkpoint(run)
        raise


def to_host(values: dict[str, torch.Tensor | float | None]) -> dict[str, float]:
    """The step's figures (loss sums, token counts, gradient norm) read from the device in one transfer.

    Each `.item()` or `int()` of a device tensor makes the host wait for the device to drain its queue, so the
    step reads everything it needs at once, after the backward and the clipping norm are queued: one wait per
    step instead of one per figure. The NaN guard needs the loss before the optimizer steps, which is why one
    remains. Counts are exact in float64 (below 2^53).
    """
    device = values["loss"].device
    stacked = torch.stack([  # DeepSpeed's clipping returns a float, or None before its first step
        torch.as_tensor(math.nan if v is None else v, dtype=torch.float64, device=device).detach().reshape(())
        for v in values.values()
    ])
    return dict(zip(values, stacked.tolist(), strict=True))


def guard_finite(run: TrainRun, loss_sum: float) -> None:
    """With `trainer.nan_guard`, stop before a non-finite loss reaches the weights (exit code 3).

    The optimizer has not stepped yet, so the checkpoint saved here holds the last good weights.
    """
    if run.trainer.nan_guard and not math.isfinite(loss_sum):
        step = run.state.step + 1
        run.optimizer.zero_grad(set_to_none=True)
        checkpoint(run)
        run.log.log({"step": step, "event": "nan_guard", "loss": loss_sum})
        raise GuardStop(f"step {step}: the loss is {loss_sum}", "the last good state is checkpointed; "
                        "lower optim.lr or check the data, then resume=auto")


def clip_gradients(run: TrainRun) -> torch.Tensor:
    """Clip to `optim.max_grad_norm` (an infinite bound when clipping is off, to still measure the norm)."""
    max_norm = run.max_grad_norm if run.max_grad_norm > 0 else math.inf
    return run.accelerator.clip_grad_norm_(run.model.parameters(), max_norm)


def optimizer_step(run: TrainRun) -> dict[str, float]:
    """Step, let the method act on the new weights and their gradients, schedule, zero; returns its figures."""
    run.optimizer.step()
    figures = {key: value for method_step in run.method_steps
               for key, value in method_step.after_step(run.state.step + 1).items()}
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return figures


def log_step(run: TrainRun, losses: dict[str, float], lr: float, grad_norm: float, clock: "Throughput") -> dict:
    """Write one training row (every `trainer.log_every` steps), from values already on the host."""
    state = run.state
    row = {
        "step": state.step,
        "epoch": epochs_done(run),
        **losses,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens": state.tokens,
        "learned_tokens": state.learned_tokens,
        "tokens_per_s": clock.rate(),
        "time": round(time.time(), 3),
    }
    run.log.log(row)
    return row


def evaluate(run: TrainRun, judged: bool = True):
    """The objective's held-out metrics, forgetting probe (perplexity and tasks), early-stopping verdict; one row.

    `judged=False` (the base model's evaluation at step 0, `trainer.eval_on_start`) only logs: there is no
    checkpoint of the base to keep as the best.
    """
    row = {"step": run.state.step}
    if run.eval_loader is not None:
        row |= run.objective.evaluate(run.model, run.eval_loader, run.trainer.eval_batches)
    if run.probe_loader is not None:
        ppl = probe_ppl(run.model, run.probe_loader, run.objective.token_loss)
        row |= {"probe_ppl": ppl, "probe_drift": ppl / run.state.base_probe_ppl - 1.0}
    if run.task_probe is not None:
        row |= run.task_probe.row(run.accelerator.unwrap_model(run.model))
    judging = judged and len(row) > 1
    verdict = judge(run.state, row, run.early_stop, run.probe.max_drift) if judging else None
    run.log.log(row)
    if run.accelerator.is_main_process:
        print_table(f"eval @ step {run.state.step}", {k: v for k, v in row.items() if k != "step"})
    return verdict


def sample(run: TrainRun) -> None:
    """Append greedy answers to the fixed held-out prompts to generations.jsonl (with `trainer.sample_every`)."""
    if run.sampler is not None:
        run.sampler.write(run.accelerator.unwrap_model(run.model), run.state.step)


def checkpoint(run: TrainRun) -> None:
    """Save a resumable checkpoint and let the caller refresh what depends on it (plots)."""
    save_checkpoint(run.accelerator, run.run_dir, run.state, run.trainer.keep_last)
    if run.on_checkpoint is not None and run.accelerator.is_main_process:
        run.on_checkpoint()


def restore_best(run: TrainRun) -> int:
    """Load the best evaluation's weights back for final/ (with `final_weights=best`); returns their step."""
    state = run.state
    path = best_checkpoint(run.run_dir, state)
    if run.trainer.final_weights != "best" or path is None or state.best_step == state.step:
        return state.step
    run.accelerator.load_state(str(path), strict=False)  # the TrainState of the run stays that of its end
    return state.best_step


def epochs_done(run: TrainRun) -> float:
    """Passes over the training data so far, fractional (2.0 after exactly two epochs).

    A stream's length is unknown to the loop, so it counts its own passes (`ftune.data.stream`).
    """
    if hasattr(run.train_loader, "passes"):
        return run.train_loader.passes
    return run.state.epoch + run.state.batch_in_epoch / max(1, len(run.train_loader))


def due(step: int, every: int) -> bool:
    """Whether a periodic action (every `every` steps; 0 = never) falls on `step`."""
    return every > 0 and step % every == 0


class Throughput:
    """Real tokens per second between two consecutive log rows."""

    def __init__(self, state: TrainState):
        self.state = state
        self.last_time, self.last_tokens = time.perf_counter(), state.tokens

    def rate(self) -> float:
        now = time.perf_counter()
        rate = (self.state.tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, self.state.tokens
        return rate
