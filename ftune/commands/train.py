"""`ftune train`: wire config -> data and model -> optimizer -> loop -> artefacts, one run per job.

Setup is atomic: everything is built (data, model, optimizer, schedule, checkpoint state, the base model's probe)
before the run directory is written, so a failed start leaves nothing behind and the same command can be run
again. The loop itself is `ftune.train.loop.fit`; what it leaves behind is `ftune.train.artefacts`.
"""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from accelerate import Accelerator
from accelerate.state import AcceleratorState, is_initialized
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, TorchDynamoPlugin, set_seed
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from ftune.config.compose import expand_sweep, load_run_config
from ftune.config.schema import RunCfg
from ftune.config.validate import advisories
from ftune.data.templates import resolve_template, template_for_artefact
from ftune.errors import ConfigError, FtuneError
from ftune.eval.generation import GENERATIONS_FILE, Sampler, held_out_conversations
from ftune.eval.loss import model_inputs
from ftune.eval.probe import base_probe_ppl, build_probe_loader
from ftune.eval.tasks import TaskProbe, load_tasks
from ftune.kernels import kernels_on
from ftune.model.dtypes import native_mixed_precision
from ftune.model.instrument import instrument_process, model_changes
from ftune.model.load import (
    check_selection_before_loading,
    count_parameters,
    initialize_adapter,
    load_tokenizer,
    prepare_model,
)
from ftune.plan.estimate import distribution_from_env, plan_rows, plan_run
from ftune.report.console import console, print_table
from ftune.report.metrics import MetricsLog, NullLog
from ftune.train.artefacts import METRICS_FILE, draw_plots, save_final, write_summary
from ftune.train.checkpoint import load_checkpoint, resolve_resume, save_trainable_weights_only
from ftune.train.ewc import build_elastic_penalty
from ftune.train.isolation import check_packing_isolates
from ftune.train.loop import TrainRun, fit, restore_best
from ftune.train.losses import build_step_loss
from ftune.train.method_steps import build_method_steps
from ftune.train.objectives import build_objective
from ftune.train.objectives.sequence_distill import resolve_teacher_responses
from ftune.train.optim import build_optimizer, build_scheduler, optimizer_steps
from ftune.train.rundir import ResumeChanges, check_fresh_output_dir, compare_with_checkpoint_config, write_run_config
from ftune.train.state import TrainState


def run(args) -> int:
    """Compose and validate every job (one, or a `-m` sweep) before the first starts; then train each."""
    jobs = expand_sweep(args.overrides) if args.multirun else [args.overrides]
    configs = [load_run_config(job, tuple(args.config_dir)) for job in jobs]
    for job, (typed, resolved) in zip(jobs, configs, strict=True):
        if args.cfg == "job":
            print(OmegaConf.to_yaml(resolved), end="")
            continue
        resolve_precision(typed, resolved)  # `auto` is compared with the process's precision as what it becomes
        fits = fits_this_process(typed)
        code = train_job(typed, resolved) if fits else run_in_child(job, args.config_dir)
        if code:
            return code
    return 0


def fits_this_process(cfg: RunCfg) -> bool:
    """Whether this process can train `cfg`: accelerate fixes precision and compilation once per process.

    accelerate keeps one `AcceleratorState` per process and refuses an Accelerator with another precision (and
    silently keeps the first compilation settings); it has no public way to start over. A job with other
    settings than an earlier one in this process (a `-m` sweep over trainer.mixed_precision, a test session)
    therefore runs in a fresh process instead.
    """
    if not is_initialized():
        return True
    state, wanted = AcceleratorState(), dynamo_plugin(cfg)
    return state.mixed_precision == cfg.trainer.mixed_precision and \
        state.dynamo_plugin.backend == wanted.backend and \
        state.dynamo_plugin.use_regional_compilation == wanted.use_regional_compilation


def run_in_child(job: list[str], config_dirs: list[str]) -> int:
    """Train one job in a fresh `ftune train` process; its output goes where this process's output goes.

    Raises:
        ConfigError: under a multi-process launch, where a child would not join the process group.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("trainer.mixed_precision / trainer.compile differ between the jobs of one launch",
                          "accelerate fixes them once per process: launch one command per setting")
    command = [sys.executable, "-m", "ftune", "train", *job, *(f"--config-dir={d}" for d in config_dirs)]
    if sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__:
        return subprocess.run(command, check=False).returncode
    child = subprocess.run(command, check=False, capture_output=True, text=True)  # captured here (e.g. by pytest)
    sys.stdout.write(child.stdout)
    sys.stderr.write(child.stderr)
    return child.returncode


def train_job(cfg: RunCfg, resolved: DictConfig) -> int:
    """Train one run; returns the process exit code (0, 3 after a guard stop is raised, 130/143 interrupted)."""
    started = time.perf_counter()
    training, tokenizer, resume = build_training(cfg, resolved)
    try:
        stop_reason, exit_code = fit(training)
        final_step = None
        if stop_reason != "interrupted":  # an interrupted run resumes from its checkpoint; final/ comes later
            final_step = restore_best(training)
            save_final(training, tokenizer, cfg.data)
        if training.accelerator.is_main_process:
            summary = write_summary(training, stop_reason, final_step, started, resume)
            print_table("summary", {k: v for k, v in summary.items() if k != "model_changes"})  # in the start table
    finally:
        training.log.close()
    return exit_code


def build_training(cfg: RunCfg, resolved: DictConfig) -> tuple[TrainRun, object, ResumeChanges | None]:
    """Build everything the loop needs, then (and only then) write the run directory."""
    resolve_precision(cfg, resolved)
    resolve_teacher_responses(cfg, resolved)  # recorded in config.yaml, compared on resume; generated with the data
    run_dir = Path(cfg.output_dir)
    checkpoint = resolve_resume(cfg.resume, run_dir) if cfg.resume is not None else None
    resume = compare_with_checkpoint_config(checkpoint, resolved, cfg.resume_force) if checkpoint else None
    if checkpoint is None:
        check_fresh_output_dir(run_dir)
    check_selection_before_loading(cfg)  # BitFit on a model without biases fails here, not after the load
    accelerator = make_accelerator(cfg)
    process_changes = instrument_process(kernels_on(cfg.trainer.cpu_kernels, accelerator.device.type))
    if accelerator.is_main_process:
        announce(cfg, accelerator, resume)
    set_seed(cfg.seed)

    tokenizer = load_tokenizer(cfg.model)
    template_for_artefact(tokenizer, cfg.data)  # a template final/ cannot carry fails now, not after training
    objective = build_objective(cfg)
    with one_builder_per_disk(accelerator):
        loaders, stats = objective.build_loaders(tokenizer, accelerator)
    loaders["probe"] = build_probe_loader(cfg.probe, tokenizer, cfg.trainer.micro_batch_size) if cfg.probe.path \
        else None
    probe_tasks = load_tasks(cfg.probe.tasks, cfg.probe.task_dir, "probe.tasks") if cfg.probe.tasks else None
    objective.load_frozen()  # a teacher or a reference copy, before the trained model: a wrong one fails first
    model = prepare_model(cfg, reference_adapter=objective.needs_reference_adapter)
    if checkpoint is None:  # a resumed run's checkpoint replaces the start weights: LoftQ and EVA are not redone
        initialize_adapter(model, cfg, loaders["train"], model_inputs)
    if cfg.data.packing:  # preference objectives refuse packing when they build their loaders, above
        check_packing_isolates(model, tokenizer.pad_token_id, cfg.model.attn_implementation, cfg.model.name_or_path)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer, loaders = prepare(accelerator, model, optimizer, loaders)
    total_steps = optimizer_steps(cfg.trainer, loaders["train"])
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    save_trainable_weights_only(accelerator)
    objective.attach(accelerator.unwrap_model(model), tokenizer)
    objective.start(model, accelerator)  # with the start weights: a checkpoint's replace them next
    penalties = [build_elastic_penalty(cfg, accelerator.unwrap_model(model), loaders["probe"], objective.token_loss,
                                       accelerator)] if cfg.ewc.weight else []  # anchored at the start weights too
    method_steps, method_penalties = build_method_steps(cfg, accelerator.unwrap_model(model), total_steps, accelerator)
    state = load_checkpoint(accelerator, checkpoint) if checkpoint else TrainState()
    if loaders.get("probe") is not None and state.base_probe_ppl is None:
        state.base_probe_ppl = base_probe_ppl(model, loaders["probe"], cfg.model, cfg.probe,
                                              cfg.trainer.mixed_precision)
    task_probe = build_task_probe(cfg, probe_tasks, tokenizer, accelerator.unwrap_model(model), state)

    if accelerator.is_main_process:  # setup succeeded: the run directory is written from here on
        write_run_config(run_dir, resolved)
    training = TrainRun(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler,
        train_loader=loaders["train"], eval_loader=loaders.get("eval"), probe_loader=loaders.get("probe"),
        trainer=cfg.trainer, early_stop=cfg.early_stop, probe=cfg.probe, max_grad_norm=cfg.optim.max_grad_norm,
        total_steps=total_steps, run_dir=run_dir, log=open_log(cfg, resolved, accelerator, run_dir), state=state,
        on_checkpoint=lambda: draw_plots(run_dir), objective=objective, task_probe=task_probe,
        sampler=None if objective.samples_itself else build_sampler(cfg, tokenizer, run_dir),
        changes=process_changes + model_changes(accelerator.unwrap_model(model)) + objective.model_changes(),
        penalties=penalties + method_penalties, method_steps=method_steps,
    )
    if resume is not None:
        training.log.log(resume.as_row(state.step))
    if accelerator.is_main_process:
        print_table(f"ftune train: {cfg.recipe} -> {run_dir}", describe_training(training, stats))
    return training, tokenizer, resume


def resolve_precision(cfg: RunCfg, resolved: DictConfig) -> None:
    """Turn `trainer.mixed_precision=auto` into this machine's native autocast dtype.

    Both in the typed config and in what config.yaml records, so a resume on the same machine compares equal.
    """
    if cfg.trainer.mixed_precision == "auto":  # build_training calls this too, for callers that skip `run`
        cfg.trainer.mixed_precision = resolved.trainer.mixed_precision = native_mixed_precision()


def make_accelerator(cfg: RunCfg) -> Accelerator:
    """An Accelerator for this run (precision, seeded data order, optional regional compilation).

    Its precision and compilation are the process's (`fits_this_process` checked them); the data seed is its own.
    """
    accelerator = Accelerator(
        mixed_precision=cfg.trainer.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        dynamo_plugin=dynamo_plugin(cfg),
        # Gradual unfreezing freezes blocks after DDP has wrapped the model; DDP then finds them unused each step
        # (and leaves their gradients None) instead of waiting for gradients that never come.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.method.unfreeze_every
        else None,
    )
    check_world_size(accelerator)
    return accelerator


def dynamo_plugin(cfg: RunCfg) -> TorchDynamoPlugin:
    """Regional compilation with inductor when `trainer.compile`, else none."""
    return TorchDynamoPlugin(backend="inductor" if cfg.trainer.compile else "no",
                             use_regional_compilation=cfg.trainer.compile)


@contextmanager
def one_builder_per_disk(accelerator: Accelerator) -> Iterator[None]:
    """Build the data cache once per disk: the main process first, then each node's local main, then the rest.

    accelerate's `main_process_first` alone makes every other rank wait for global rank 0 only: on a disk
    shared by the nodes they then read its entry, but with node-local caches every rank of the other nodes
    misses and they all build at once (correct, since entries are published whole, but several times the work
    and memory per node). `local_main_process_first` alone has one process per node build, which on a shared
    disk builds the same entry once per node. Nested, the global main builds first; each node's local main
    then finds that entry (shared disk) or builds its own (local disk) while its node's other ranks wait; they
    then read it. Every rank passes the same two barriers, so none can hang.
    """
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        yield



def prepare(accelerator: Accelerator, model, optimizer, loaders: dict) -> tuple[object, object, dict]:
    """Model, optimizer and DataLoaders prepared by accelerate; a stream's loader is left as it is.

    accelerate would split a stream again between the processes and skip a resumed position by collating every
    batch; a `StreamLoader` is already this process's share on its device (`ftune.data.stream`).
    """
    prepared_keys = [key for key, loader in loaders.items() if isinstance(loader, DataLoader)]
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *(loaders[key] for key in prepared_keys))
    return model, optimizer, loaders | dict(zip(prepared_keys, prepared, strict=True))


def build_task_probe(cfg: RunCfg, tasks: dict | None, tokenizer, model, state: TrainState) -> TaskProbe | None:
    """The lm-eval tasks of `probe.tasks`, with the base model's scores (measured now, or from the resumed state)."""
    if tasks is None:
        return None
    probe = TaskProbe(tasks, cfg.probe.tasks, tokenizer, cfg.probe.limit, cfg.trainer.micro_batch_size)
    if state.base_task_scores is None:
        probe.measure_base(model)
        state.base_task_scores = probe.base
    probe.base = state.base_task_scores
    return probe


def build_sampler(cfg: RunCfg, tokenizer, run_dir: Path) -> Sampler | None:
    """With `trainer.sample_every`, the first `trainer.sample_prompts` held-out conversations to answer."""
    if not cfg.trainer.sample_every:
        return None
    conversations = held_out_conversations(cfg.data.eval_path, cfg.data, cfg.trainer.sample_prompts)
    return Sampler(conversations, tokenizer, resolve_template(cfg.data.chat_template, tokenizer),
                   run_dir / GENERATIONS_FILE)


def open_log(cfg: RunCfg, resolved: DictConfig, accelerator: Accelerator, run_dir: Path) -> MetricsLog | NullLog:
    """metrics.jsonl (+ tracker) on the main process; a no-op log elsewhere."""
    if not accelerator.is_main_process:
        return NullLog()
    return MetricsLog(run_dir / METRICS_FILE, cfg.logger, run_dir.name, OmegaConf.to_container(resolved))


def announce(cfg: RunCfg, accelerator: Accelerator, resume: ResumeChanges | None) -> None:
    """Before anything loads: the memory plan, the config's advisories and what a resume changes."""
    gpus, sharding = distribution_from_env()
    device = "cuda" if accelerator.device.type == "cuda" else "cpu"
    try:
        plan = plan_run(cfg, gpus=gpus, sharding=sharding, device=device, step_loss=build_step_loss)
        print_table(f"plan: {cfg.recipe}", plan_rows(plan))
    except FtuneError as err:  # an estimate it cannot make (e.g. no config.json) must not stop training
        console.print(f"plan: not available ({err.one_line()})")
    for note in advisories(cfg):
        console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    for kind, changes in (("applied", resume.applied), ("forced (resume_force=true)", resume.forced)) if resume else ():
        for key, (old, new) in changes.items():
            console.print(f"resume: {key}: {old!r} -> {new!r} {kind}", markup=False, highlight=False, soft_wrap=True)


def describe_training(training: TrainRun, stats: dict) -> dict:
    """The table printed before the first step."""
    total, trainable = count_parameters(training.accelerator.unwrap_model(training.model))
    train, held_out = stats["train"], stats["eval"]
    streamed = train is None  # data.streaming: counted only as the stream is read
    return {
        "examples (train / eval)": f"{'streamed' if streamed else train.kept} / {held_out.kept if held_out else 0}",
        "truncated / dropped": "streamed" if streamed else f"{train.truncated} / {sum(train.dropped.values())}",
        "parameters (trainable / total)": f"{trainable:,} / {total:,} ({100 * trainable / total:.2f}%)",
        "optimizer steps": f"{training.total_steps} (from step {training.state.step})",
        **training.objective.describe(),
        "base probe ppl": training.state.base_probe_ppl,
        "processes": training.accelerator.num_processes,
        "changes to the model": "\n".join(change.line() for change in training.changes) or "none",
    }


def check_world_size(accelerator: Accelerator) -> None:
    """Refuse a launch whose processes do not see each other (each would train alone and write as rank 0)."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"accelerate launched {launched} processes but they did not form one group",
            "on a machine without GPUs set ACCELERATE_USE_CPU=true for --multi_gpu runs (gloo)",
        )
