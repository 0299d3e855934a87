"""`ftune train`: build data, model, optimizer and schedule from a validated config, train, write the run dir.

Build order follows DESIGN.md's flow: data (needs only the tokenizer) -> model -> optimizer and schedule ->
checkpoint restore -> loop -> final artefact, summary and plots.
"""

import json
import resource
import shutil
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftune.config.schema import RunCfg
from ftune.errors import ConfigError, FtuneError
from ftune.report.console import console, print_table


def run(args) -> int:
    """Compose and validate every job (one, or a `-m` sweep) before the first starts; then train each."""
    from ftune.config.compose import expand_sweep, load_run_config

    jobs = expand_sweep(args.overrides) if args.multirun else [args.overrides]
    configs = [load_run_config(job) for job in jobs]
    for typed, resolved in configs:
        if args.cfg == "job":
            print(OmegaConf.to_yaml(resolved), end="")
            continue
        code = run_train(typed, resolved)
        if code:
            return code
    return 0


def run_train(cfg: RunCfg, resolved: DictConfig) -> int:
    """Train one run; returns the process exit code (0, or 130/143 when interrupted)."""
    from ftune.train.loop import fit, restore_best

    started = time.perf_counter()
    run, tokenizer = build_run(cfg, resolved)
    final_step = None
    try:
        stop_reason, exit_code = fit(run)
        if stop_reason != "interrupted":  # an interrupted run resumes from its checkpoint; final/ comes later
            final_step = restore_best(run)
            save_final(run.accelerator, run.model, tokenizer, run.run_dir)
        if run.accelerator.is_main_process:
            print_table("summary", write_summary(run, stop_reason, final_step, started))
    finally:
        run.log.close()
        release_accelerator()
    return exit_code


def release_accelerator() -> None:
    """Forget accelerate's process-wide state, so the next run in this process may use another precision.

    accelerate keeps one AcceleratorState per process and refuses a second Accelerator with different
    settings; `_reset_state` is how accelerate's own tests start over (there is no public equivalent).
    """
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


def build_run(cfg: RunCfg, resolved: DictConfig):
    """Everything the loop needs, prepared by accelerate and restored from a checkpoint when resuming."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, TorchDynamoPlugin, set_seed

    from ftune.model.load import load_teacher, load_tokenizer, prepare_model
    from ftune.train.checkpoint import load_checkpoint, resolve_resume, save_trainable_weights_only
    from ftune.train.loop import TrainRun
    from ftune.train.optim import build_optimizer, build_scheduler, optimizer_steps
    from ftune.train.state import TrainState

    run_dir = Path(cfg.output_dir)
    release_accelerator()  # settings of an earlier Accelerator in this process (a sweep job, ftune eval) must not leak
    accelerator = Accelerator(
        mixed_precision=cfg.trainer.mixed_precision,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor" if cfg.trainer.compile else "no",
                                        use_regional_compilation=cfg.trainer.compile),
    )
    check_world_size(accelerator)
    if accelerator.is_main_process:
        prepare_run_dir(run_dir, resolved, resuming=cfg.resume is not None)
        print_plan(cfg, accelerator)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    with accelerator.main_process_first():  # rank 0 fills the data cache, the others read it: no write race
        loaders, stats = build_loaders(cfg, tokenizer)
    teacher = load_teacher(cfg)  # None unless distilling; checks the vocabularies match first
    model = prepare_model(cfg)
    optimizer = build_optimizer(model, cfg.optim)
    model, optimizer, *prepared = accelerator.prepare(model, optimizer, *[v for v in loaders.values() if v])
    loaders = dict(zip([k for k, v in loaders.items() if v], prepared, strict=True))
    total_steps = optimizer_steps(cfg.trainer, len(loaders["train"]))
    scheduler = build_scheduler(optimizer, cfg.optim, total_steps)
    accelerator.register_for_checkpointing(scheduler)
    save_trainable_weights_only(accelerator)

    state = TrainState()
    if cfg.resume is not None:
        state = load_checkpoint(accelerator, resolve_resume(cfg.resume, run_dir))
    run = TrainRun(
        accelerator, model, optimizer, scheduler, loaders["train"], loaders.get("eval"), loaders.get("probe"),
        cfg.trainer, cfg.early_stop, cfg.probe, cfg.optim.max_grad_norm, total_steps, run_dir,
        open_log(cfg, resolved, accelerator, run_dir), state, on_checkpoint=lambda: draw_plots(run_dir),
        teacher=teacher, distill=cfg.distill,
    )
    measure_base_probe(run, cfg)
    if accelerator.is_main_process:
        print_table(f"ftune train: {cfg.recipe} -> {run_dir}", describe_run(run, stats))
    return run, tokenizer


def build_loaders(cfg: RunCfg, tokenizer) -> tuple[dict, dict]:
    """Train, eval and probe loaders (eval and probe None when not configured) and the data statistics."""
    from ftune.data.pipeline import build_loader, build_split, build_train_split
    from ftune.train.probe import build_probe_loader

    batch = cfg.trainer.micro_batch_size
    train = build_train_split(tokenizer, cfg.data, cfg.seed)
    held_out = build_split(cfg.data.eval_path, tokenizer, cfg.data) if cfg.data.eval_path else None
    attn = cfg.model.attn_implementation
    loaders = {
        "train": build_loader(train, tokenizer, cfg.data, attn, batch, shuffle=True, workers=cfg.trainer.num_workers,
                              seed=cfg.seed),
        "eval": build_loader(held_out, tokenizer, cfg.data, attn, batch, shuffle=False) if held_out else None,
        "probe": build_probe_loader(cfg.probe, tokenizer, batch) if cfg.probe.path else None,
    }
    return loaders, {"train": train.stats, "eval": held_out.stats if held_out else None}


def measure_base_probe(run, cfg: RunCfg) -> None:
    """Fill in the base model's probe perplexity (cached) before the first step; a resumed run has it."""
    from ftune.train.probe import base_probe_ppl

    if run.probe_loader is not None and run.state.base_probe_ppl is None:
        run.state.base_probe_ppl = base_probe_ppl(run.model, run.probe_loader, run.accelerator, cfg.model, cfg.probe)


def open_log(cfg: RunCfg, resolved: DictConfig, accelerator, run_dir: Path):
    """metrics.jsonl (+ tracker) on the main process; a no-op log elsewhere."""
    from ftune.report.metrics import MetricsLog, NullLog

    if not accelerator.is_main_process:
        return NullLog()
    return MetricsLog(run_dir / "metrics.jsonl", cfg.logger, run_dir.name, OmegaConf.to_container(resolved))


def describe_run(run, stats: dict) -> dict:
    """The table printed before the first step."""
    from ftune.model.load import count_parameters

    total, trainable = count_parameters(run.accelerator.unwrap_model(run.model))
    train, held_out = stats["train"], stats["eval"]
    return {
        "examples (train / eval)": f"{train.kept} / {held_out.kept if held_out else 0}",
        "truncated / dropped": f"{train.truncated} / {sum(train.dropped.values())}",
        "parameters (trainable / total)": f"{trainable:,} / {total:,} ({100 * trainable / total:.2f}%)",
        "optimizer steps": f"{run.total_steps} (from step {run.state.step})",
        "base probe ppl": run.state.base_probe_ppl,
        "processes": run.accelerator.num_processes,
    }


def print_plan(cfg: RunCfg, accelerator) -> None:
    """The `ftune plan` table for this run, from the meta device, before any weight loads."""
    from ftune.model.plan import distribution_from_env, plan_rows, plan_run

    gpus, sharding = distribution_from_env()
    device = "cuda" if accelerator.device.type == "cuda" else "cpu"
    try:
        print_table(f"plan: {cfg.recipe}", plan_rows(plan_run(cfg, gpus=gpus, sharding=sharding, device=device)))
    except FtuneError as err:  # an estimate it cannot make (e.g. a non-Llama model) must not stop training
        console.print(f"plan: not available ({err.one_line()})")


def check_world_size(accelerator) -> None:
    """Refuse a launch whose processes do not see each other (each would train alone and write as rank 0)."""
    import os

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise ConfigError(
            f"accelerate launched {launched} processes but they did not form one group",
            "on a machine without GPUs set ACCELERATE_USE_CPU=true for --multi_gpu runs (gloo)",
        )


def prepare_run_dir(run_dir: Path, resolved: DictConfig, resuming: bool) -> None:
    """Create the run directory and write config.yaml; refuse to mix a fresh run into an old one."""
    if not resuming and run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"output_dir={run_dir}: already holds a run", "pass resume=auto or a new output_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(resolved, run_dir / "config.yaml")


def save_final(accelerator, model, tokenizer, run_dir: Path) -> Path:
    """Write `final/` (adapter or full model, plus tokenizer and chat template) atomically.

    Every rank calls `get_state_dict` (a collective under FSDP/DeepSpeed); only the main one writes.
    """
    state_dict = accelerator.get_state_dict(model)
    final, staging = run_dir / "final", run_dir / ".tmp-final"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state_dict)
        tokenizer.save_pretrained(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
    accelerator.wait_for_everyone()
    return final


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl."""
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def draw_plots(run_dir: Path) -> None:
    """Redraw plots/ from metrics.jsonl."""
    from ftune.report.plots import write_plots

    write_plots(read_metrics(run_dir), run_dir / "plots")


def write_summary(run, stop_reason: str, final_step: int | None, started: float) -> dict:
    """summary.json: why the run ended, the best evaluation, totals, losses, parameters, time and peak memory."""
    from ftune.model.load import count_parameters
    from ftune.train.loop import epochs_done

    rows = read_metrics(run.run_dir)
    losses = [r["loss"] for r in rows if "loss" in r]
    state = run.state
    total_params, trainable_params = count_parameters(run.accelerator.unwrap_model(run.model))
    summary = {
        "stop_reason": stop_reason,
        "steps": state.step,
        "epochs": round(epochs_done(run), 4),
        "best_step": state.best_step,
        "best_metric": {run.early_stop.metric: state.best_metric} if state.best_step is not None else None,
        "final_weights_step": final_step,
        "tokens": state.tokens,
        "learned_tokens": state.learned_tokens,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "base_probe_ppl": state.base_probe_ppl,
        "trainable_params": trainable_params,
        "total_params": total_params,
        "wall_time_s": round(time.perf_counter() - started, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    draw_plots(run.run_dir)
    return summary
