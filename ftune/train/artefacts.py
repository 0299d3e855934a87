"""What a run leaves for its users once the loop ends: `final/`, `summary.json` and the plots.

`final/` is what people load (a PEFT adapter or a full model, with tokenizer, chat template and model card),
written atomically; `summary.json` says why the run ended and what it achieved; plots are redrawn from metrics.jsonl.
"""

import copy
import json
import resource
import time
from pathlib import Path

import torch
from transformers import GenerationConfig

from ftune.atomic import atomic_dir, write_text
from ftune.config.schema import DataCfg
from ftune.data.templates import template_for_artefact
from ftune.model.load import count_parameters
from ftune.report.card import render_card
from ftune.train.card import describe_hardware, run_card_facts
from ftune.train.loop import TrainRun, epochs_done
from ftune.train.rundir import ResumeChanges

FINAL_DIR = "final"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.jsonl"


def save_final(run: TrainRun, tokenizer, data_cfg: DataCfg) -> Path:
    """Write `final/` (adapter or full model, tokenizer, chat template, generation stop ids, card) atomically.

    The template the run rendered with travels with the weights (`chat_template.jinja`), and
    `generation_config.json` stops at its end-of-turn token, so `apply_chat_template` and generation on the
    artefact reproduce what training saw, also for a named template on a base that has none. `README.md` is
    ftune's model card (replacing the empty template PEFT writes).
    Every rank calls `get_state_dict` (a collective under FSDP/DeepSpeed); only the main one writes.
    """
    accelerator = run.accelerator
    state_dict = accelerator.get_state_dict(run.model)
    final = run.run_dir / FINAL_DIR
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(run.model)
        template, stop_ids = template_for_artefact(tokenizer, data_cfg)
        with atomic_dir(final) as staging:
            model.save_pretrained(staging, state_dict=state_dict, **trained_adapter_only(model))
            tokenizer.chat_template = template
            tokenizer.save_pretrained(staging)
            generation = copy.deepcopy(base_generation_config(model))
            generation.eos_token_id = stop_ids
            generation.save_pretrained(staging)
            hardware = describe_hardware(accelerator.device, accelerator.num_processes)
            write_text(staging / "README.md", render_card(run_card_facts(run.run_dir, hardware)))
    accelerator.wait_for_everyone()
    return final


def trained_adapter_only(model) -> dict:
    """`save_pretrained` arguments that save only the adapter being trained, not a frozen reference adapter.

    PEFT saves every loaded adapter by default, the others into sub-directories; final/ holds one adapter. Nor
    does it hold the base's embedding matrices, which PEFT saves whole once they have grown for added tokens
    (`model.add_tokens`): the trained rows of those tokens (`trainable_token_indices`) are all they gain, and a
    loader grows the base to the saved tokenizer before loading them (`AutoPeftModelForCausalLM`, `ftune merge`).
    """
    if not hasattr(model, "peft_config"):
        return {}
    return {"selected_adapters": [model.active_adapter], "save_embedding_layers": False}


def base_generation_config(model) -> GenerationConfig:
    """The generation settings of the model under any PEFT wrapper (a fresh default when it has none)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, "generation_config", None) or GenerationConfig()


def read_metrics(run_dir: Path) -> list[dict]:
    """The rows of metrics.jsonl."""
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def draw_plots(run_dir: Path) -> None:
    """Redraw plots/ from metrics.jsonl."""
    from ftune.report.plots import write_plots

    write_plots(read_metrics(run_dir), run_dir / "plots")


def peak_accelerator_memory(device: torch.device) -> dict[str, float]:
    """`peak_accelerator_mb`: the most memory torch's allocator held on a CUDA device during the run; {} on CPU.

    RSS says nothing about GPU memory, and this is the figure `ftune plan` estimates.
    """
    if device.type != "cuda":
        return {}
    return {"peak_accelerator_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)}


def write_summary(run: TrainRun, stop_reason: str, final_step: int | None, started: float,
                  resume: ResumeChanges | None) -> dict:
    """summary.json: why the run ended, the best evaluation, totals, losses, parameters, time and peak memory."""
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
        "hardware": describe_hardware(run.accelerator.device, run.accelerator.num_processes),
        "model_changes": [change.as_record() for change in run.changes],
        **peak_accelerator_memory(run.accelerator.device),
    }
    if resume is not None:
        summary["resume_changed"], summary["resume_forced"] = resume.applied, resume.forced
    write_text(run.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2))
    draw_plots(run.run_dir)
    return summary
