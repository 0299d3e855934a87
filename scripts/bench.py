"""Benchmark ftune's LoRA training against TRL's SFTTrainer, in the same run, on the same machine, data and model.

    pip install -e ".[bench]"          # TRL, a benchmark dependency only
    python scripts/bench.py --json results/bench.json     # ~18 min on 2 CPU cores
    python scripts/bench.py --quick    # one repeat, a few steps, the tiny model only: a smoke test
    python scripts/bench.py --fp32 --bf16-base            # also fp32 autocast-free runs and bf16 frozen bases
    python scripts/bench.py --only grpo --json results/bench.json     # GRPO against TRL's GRPOTrainer, ~4 min

Every configuration trains the same LoRA (r=8, alpha 16, dropout 0.05, all linear layers) with the same AdamW,
cosine schedule, learning rate, 512-token sequence length, micro-batch 4 x accumulation 2 and number of optimizer
steps, on the shipped chat data (learning every token, TRL's default, so the losses compare). Each run is its own
process (fresh memory, fresh data cache) and configurations alternate, repeat by repeat, so a slow spell of the
machine hits all of them; the tables give medians. Models: the embedded `tiny` model and a ~64M-parameter one
built by scripts/build_tiny_model.py (preset `small`, barely pretrained: speed does not depend on the weights).
TRL runs its defaults except what a configuration names; note that SFTConfig turns gradient checkpointing on by
default (slower, less memory), so `trl_grouped_no_gc` is also measured as TRL's fastest option set.

Figures per run: real (non-pad) and learned tokens per second after warm-up, padding share of the batches, peak
RSS, time to the end of the first step (model load, data preparation, one step), the mean loss of the last five
steps, and model FLOPs utilisation: LoRA costs about 4N FLOPs per token (forward 2N, input gradients 2N; frozen
weights get no weight gradient), over this machine's GEMM rate measured here in the dtype trained in. Attention
FLOPs are left out of 4N, so MFU slightly understates the work on long rows.

TRL caveat, measured on transformers 5: TRL's packing (`packing=True`, best-fit-decreasing, padding-free) passes
position ids that `sdpa`/`eager` attention ignore, so its packed documents attend to each other. Its packed figure
is reported, marked as not isolated; ftune's packing isolates documents with a block-diagonal mask.

GRPO (`--only grpo`): ftune's `recipe=tiny_grpo` against TRL's GRPOTrainer (no vLLM) on the embedded model, fp32,
no gradient checkpointing: the same LoRA (ftune's `method=lora`: r 8, alpha 16, dropout 0.05 on all linear layers;
both tools switch dropout off, ftune always and TRL with `disable_dropout=True`), the shipped prompts in the file's
order through the tokenizer's chat template (the same token ids), the two rewards of
ftune/assets/rewards/tinyworld_tense.py weighted 1 and 0.5, 4 prompts x 8 completions of up to 24 tokens per step
(temperature 1, top_p 1), the `dapo` loss with epsilon 0.2 and beta 0, AdamW at 2e-3 constant. Per step, each tool
does the same work, in its own code:

- ftune: `GrpoObjective.prepare_step` samples the 32 completions in one `generate` call (4 prompts, left-padded,
  `num_return_sequences=8`, KV cache, eval mode), decodes them, scores them with the reward functions, turns each
  group's rewards into advantages and lays prompt and completion out in one row with its position ids; then one
  forward of those 32 rows through the policy (its fused CPU LoRA layers; the head and the log-probs chunked over
  the completion tokens), the clipped loss, the backward, clipping and AdamW. No reference or old-policy forward:
  beta 0 and one step per generation make the ratio 1 (`old_per_token_logps=None`).
- TRL: `_prepare_inputs` renders and tokenizes the 32 prompt copies (its sampler repeats each prompt 8 times),
  samples the 32 rows in one `generate` call on the PEFT model (KV cache), decodes them, scores them, computes the
  advantages and buffers the batch; `compute_loss` then runs one forward of the 32 rows through PEFT's LoRA
  layers, whose head (TRL's `add_fused_lm_head`) runs in tiles over the completion positions only and returns
  their log-probs and entropies (a logged metric), the same clipped loss, then the backward, clipping and AdamW.
  It too skips the old-policy and reference forwards here.

Figures per run (after 2 warm-up steps): completions generated and trained per second, completion tokens per
second, peak RSS, mean completion length, the mean reward of the first and the last 3 steps, and each step's
seconds split into `generate`, the reward functions, the rest of the rollout (decoding, advantages, layout), the
training forward with its loss, the backward, and the rest (optimizer, clipping, logging), each timed by a patch in
the bench's worker process only (`PhaseClock`). Each tool samples its own completions, so once training starts
their lengths part: a step decodes until its longest completion ends (`decoded_positions`), and the headline also
gives the ratios at equal work, generation seconds per decoded position and training forward + backward seconds.
The runs are deterministic (seed 0): repeats measure the machine's noise, not other samples.
"""

import argparse
import bisect
import functools
import inspect
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHAT_TRAIN = REPO / "ftune" / "assets" / "data" / "chat" / "train.jsonl"
PAIRS_TRAIN = REPO / "ftune" / "assets" / "data" / "pairs" / "train.jsonl"
TINY_MODEL = REPO / "ftune" / "assets" / "models" / "tiny"
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
MAX_LENGTH, MICRO_BATCH, GRAD_ACCUM, LR, WARMUP_RATIO, WEIGHT_DECAY, SEED = 512, 4, 2, 1e-3, 0.1, 0.0, 0
LAST_LOSSES = 5
PROMPTS_TRAIN = REPO / "ftune" / "assets" / "data" / "prompts" / "train.jsonl"
GRPO_REWARDS = REPO / "ftune" / "assets" / "rewards" / "tinyworld_tense.py"
GRPO_REWARD_WEIGHTS = {"tense_reward": 1.0, "one_sentence_reward": 0.5}  # recipes/tiny_grpo.yaml's
GRPO_PROMPTS, GRPO_GENERATIONS, GRPO_COMPLETION_LENGTH, GRPO_LR, GRPO_EPSILON = 4, 8, 24, 2e-3, 0.2
GRPO_WARMUP, GRPO_REWARD_STEPS, GRPO_SPEED_TARGET = 2, 3, 1.5
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
AUTOCAST = {True: "bf16", False: "no", None: "auto"}
"""Config.bf16 -> ftune's trainer.mixed_precision."""


@dataclass(frozen=True)
class Config:
    """One way of training: the tool, its batching and its autocast dtype."""

    name: str
    tool: str  # "ftune" or "trl"
    batching: str  # "padded", "grouped" (length-grouped, padded), "ordered" (see `ensure_ordered_data`) or "packed"
    bf16: bool | None = True  # None: ftune's `trainer.mixed_precision=auto` (what the CPU computes natively)
    row_length: int | None = None  # packed rows hold this many tokens (None: the model's sequence length)
    compile: bool = False
    gradient_checkpointing: bool | None = None  # None: the tool's default (TRL: on, ftune: off)
    base_dtype: str = "fp32"  # frozen base weights in fp32, or bf16 (LoRA weights and optimizer state stay fp32)
    overrides: tuple[str, ...] = ()  # further ftune overrides
    objective: str = "sft"  # or "dpo": pairs, from one shared start adapter (`ensure_start_adapter`)
    note: str = ""


CONFIGS = [
    Config("trl_default", "trl", "padded", note="SFTConfig defaults (bf16 autocast, pad to longest)"),
    Config("trl_grouped", "trl", "grouped", note="train_sampling_strategy=group_by_length"),
    Config("trl_grouped_no_gc", "trl", "grouped", gradient_checkpointing=False,
           note="and gradient_checkpointing=False (TRL defaults to True)"),
    Config("trl_packed", "trl", "packed", note="packing=True (BFD, padding-free): NOT isolated on sdpa"),
    Config("ftune_padded", "ftune", "padded"),
    Config("ftune_grouped", "ftune", "grouped", note="data.group_by_length=true"),
    Config("ftune_packed", "ftune", "packed", note="data.packing=true, isolated (block-diagonal mask)"),
    Config("ftune_packed_256", "ftune", "packed", row_length=256, note="packed into 256-token rows"),
]
COMPILED_CONFIGS = [
    Config("ftune_packed_256_compiled", "ftune", "packed", row_length=256, compile=True,
           note="trainer.compile=true (torch.compile, regional)"),
]
BF16_BASE_CONFIGS = [
    Config("trl_grouped_no_gc_bf16_base", "trl", "grouped", gradient_checkpointing=False, base_dtype="bf16",
           note="and the frozen base loaded in bf16"),
    Config("ftune_grouped_bf16_base", "ftune", "grouped", base_dtype="bf16", note="and model.dtype=bf16"),
]
FP32_CONFIGS = [
    Config("trl_default_fp32", "trl", "padded", bf16=False, note="bf16=False"),
    Config("ftune_grouped_fp32", "ftune", "grouped", bf16=False, note="trainer.mixed_precision=no"),
]

BASE_CONFIGS = [
    Config("trl_no_gc", "trl", "ordered", gradient_checkpointing=False,
           note="length-grouped, gradient_checkpointing=False, bf16 (TRL's fastest on the 64M model)"),
    Config("trl_no_gc_fp32", "trl", "ordered", bf16=False, gradient_checkpointing=False,
           note="the same with bf16=False (faster on a CPU without bf16 instructions)"),
    Config("ftune_default", "ftune", "ordered", bf16=None,
           note="ftune's CPU defaults: length-grouped, mixed_precision=auto, fused LoRA layers with sparse dropout"),
    Config("ftune_no_cpu_kernels", "ftune", "ordered", bf16=None, overrides=("trainer.cpu_kernels=off",),
           note="trainer.cpu_kernels=off: PEFT's own layers and torch's dropout, as TRL runs them"),
    Config("ftune_default_pad8", "ftune", "ordered", bf16=None, overrides=("data.pad_to_multiple_of=8",),
           note="and data.pad_to_multiple_of=8: lengths rounded up as on a GPU (the CPU default before)"),
    Config("ftune_default_no_dropout", "ftune", "ordered", bf16=None, overrides=("lora.dropout=0.0",),
           note="and lora.dropout=0: what LoRA dropout still costs"),
]
"""The ~100M model: ftune's defaults against TRL's fastest options (checkpointing off, either dtype), every
configuration on the same length-grouped batches in the same order (`ensure_ordered_data`)."""

BIG_VOCAB_CONFIGS = [
    Config("trl_bigvocab", "trl", "padded", gradient_checkpointing=False,
           note="gradient_checkpointing=False, no packing (TRL's fastest)"),
    Config("ftune_bigvocab", "ftune", "padded", note="defaults: chunked loss, trainer.loss_chunk_size=256"),
    Config("ftune_bigvocab_unfused", "ftune", "padded", overrides=("trainer.loss_chunk_size=0",),
           note="trainer.loss_chunk_size=0: the full logits (with --unfused)"),
]

DPO_CONFIGS = [
    Config("trl_dpo", "trl", "ordered", objective="dpo",
           note="DPOConfig defaults (bf16 autocast, gradient checkpointing)"),
    Config("trl_dpo_fp32", "trl", "ordered", bf16=False, objective="dpo", note="bf16=False"),
    Config("trl_dpo_no_gc", "trl", "ordered", gradient_checkpointing=False, objective="dpo",
           note="gradient_checkpointing=False"),
    Config("trl_dpo_no_gc_fp32", "trl", "ordered", bf16=False, gradient_checkpointing=False, objective="dpo",
           note="gradient_checkpointing=False, bf16=False"),
    Config("ftune_dpo", "ftune", "ordered", bf16=None, objective="dpo",
           note="objective=dpo, ftune's defaults (mixed_precision=auto, chunked sequence log-probs, one row per "
                "pair: the prompt once)"),
    Config("ftune_dpo_two_rows", "ftune", "ordered", bf16=None, objective="dpo", overrides=("pref.share_prompt=false",),
           note="pref.share_prompt=false: each response repeats its prompt in a row of its own, as TRL's do"),
]
"""DPO (sigmoid loss, beta 0.1, TRL's defaults) against TRL's DPOTrainer in each of its dtypes, with and without
its default gradient checkpointing: TRL's lowest peak RSS and its fastest pairs/s are the best of these four."""

GRPO_CONFIGS = [
    Config("trl_grpo", "trl", "ordered", bf16=False, gradient_checkpointing=False, objective="grpo",
           note="GRPOConfig: bf16=False, gradient_checkpointing=False, use_vllm=False, disable_dropout=True"),
    Config("ftune_grpo", "ftune", "ordered", bf16=False, objective="grpo",
           note="recipe=tiny_grpo, trainer.mixed_precision=no (CPU kernels on, ftune's CPU default)"),
]
"""GRPO against TRL's GRPOTrainer, both in fp32 without gradient checkpointing (bf16 is emulated on CPUs without
bf16 instructions; checkpointing only costs time on a model this small)."""

ALL_CONFIGS = (CONFIGS + BF16_BASE_CONFIGS + COMPILED_CONFIGS + FP32_CONFIGS + BASE_CONFIGS + BIG_VOCAB_CONFIGS
               + DPO_CONFIGS + GRPO_CONFIGS)
assert len({c.name for c in ALL_CONFIGS}) == len(ALL_CONFIGS), "a worker finds its configuration by name"
BIG_VOCAB = {"vocab_size": 128_256, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}
"""Llama-3's vocabulary on a random 2-layer model: the head and the loss are most of the step."""


@dataclass
class Model:
    """A model to benchmark on and its run length: warm-up steps (not timed) and timed steps."""

    name: str
    path: Path
    warmup: int
    timed: int
    params: int = 0
    max_length: int = MAX_LENGTH
    grad_accum: int = GRAD_ACCUM
    data: Path = CHAT_TRAIN
    adapter: Path | None = None  # DPO: the LoRA both tools start from (`ensure_start_adapter`)
    objective: str = "sft"


@dataclass
class StepLog:
    """What a worker records per micro-batch (tokens) and per optimizer step (end time, loss).

    `real` and `slots` are the tokens and padded slots the forward computed (padding share, MFU); `sequences`
    and `sequence_tokens` the sequences a batch scores and their tokens as if each were a row of its own, which
    is what TRL's batches hold and ftune's one-row pairs (`pref.share_prompt`) hold each prompt once of.
    """

    real: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    sequences: list[int] = field(default_factory=list)
    sequence_tokens: list[int] = field(default_factory=list)
    learned: list[int] = field(default_factory=list)
    step_end: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)

    def count(self, batch: dict) -> dict:
        """Record one collated batch's real tokens, token slots and learned tokens; returns it unchanged."""
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if "num_tokens" in batch:  # ftune's collators count real tokens themselves (packed rows have a 4D mask)
            real = int(batch["num_tokens"])
        elif mask is not None and mask.dim() == 2:
            real = int(mask.sum())
        else:  # padding-free rows (TRL's packing) hold no pad
            real = ids.numel()
        self.real.append(real)
        self.slots.append(ids.numel())
        if "logp_slot" in batch:  # a pair per row, its prompt (the tokens before the first labelled one) once
            self.sequences.append(2 * len(ids))
            self.sequence_tokens.append(real + int((batch["labels"] != -100).int().argmax(1).sum()))
        else:
            self.sequences.append(len(ids))
            self.sequence_tokens.append(real)
        learned = batch["labels"][:, 1:] != -100 if "labels" in batch else batch["completion_mask"][:, 1:]  # TRL's DPO
        self.learned.append(int(learned.sum()))
        return batch


def summarize_worker(log: StepLog, started: float, model: "Model", extra: dict) -> dict:
    """Throughput over the timed steps (after the warm-up), from per-batch token counts and step end times."""
    steps, warmup = len(log.step_end), model.warmup
    window = slice(warmup * model.grad_accum, steps * model.grad_accum)
    seconds = log.step_end[-1] - log.step_end[warmup - 1]
    real, learned = sum(log.real[window]), sum(log.learned[window])
    return {
        "steps": steps,
        "real_tokens_per_s": real / seconds,
        "learned_tokens_per_s": learned / seconds,
        "padding_share": 1 - sum(log.real) / sum(log.slots),
        "first_step_s": log.step_end[0] - started,
        "final_loss": statistics.mean(log.loss[-LAST_LOSSES:]),
        "pairs_per_s": sum(log.sequences[window]) / 2 / seconds,  # a pair batch scores two sequences per pair
        "losses": log.loss,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "batches": list(zip(log.sequences, log.sequence_tokens, strict=True)),
        **extra,
    }


def run_ftune(config: Config, model: Model, out: Path, started: float) -> dict:
    """Train with `ftune train` in this process, counting the batches its collators produce."""
    from omegaconf import OmegaConf

    import ftune.train.objectives.preference as preference
    import ftune.train.objectives.tokens as tokens
    from ftune.commands.train import train_job
    from ftune.config.compose import load_run_config
    from ftune.train.artefacts import read_metrics

    log = StepLog()

    def counting(build_loader):
        def counted_loader(*args, **kwargs):
            training = kwargs.get("shuffle")  # the training loader only
            if training and config.batching == "ordered":
                kwargs["shuffle"] = False  # the file's order, as TRL reads it
            loader = build_loader(*args, **kwargs)
            if training:
                collate = loader.collate_fn
                loader.collate_fn = lambda rows: log.count(collate(rows))
            return loader
        return counted_loader


    tokens.build_loader = counting(tokens.build_loader)  # where the SFT objective looks it up
    preference.build_preference_loader = counting(preference.build_preference_loader)  # and objective=dpo
    overrides = [
        f"model.name_or_path={model.path}", f"data.path={model.data}", "data.eval_path=null", "probe.path=null",
        f"data.max_length={config.row_length or model.max_length}",
        f"data.group_by_length={config.batching == 'grouped'}",
        *(["objective=dpo", f"model.adapter={model.adapter}"] if config.objective == "dpo" else
          ["data.train_on=everything", f"data.packing={config.batching == 'packed'}",
           *[f"lora.{key}={value}" for key, value in LORA.items()]]),
        f"trainer.max_steps={model.warmup + model.timed}",
        f"trainer.micro_batch_size={MICRO_BATCH}", f"trainer.grad_accum={model.grad_accum}", "trainer.eval_every=0",
        "trainer.save_every=0", "trainer.log_every=1", "trainer.final_weights=last",
        f"trainer.mixed_precision={AUTOCAST[config.bf16]}", f"trainer.compile={config.compile}",
        f"model.dtype={config.base_dtype}", f"optim.lr={LR}",
        f"optim.warmup_ratio={WARMUP_RATIO}", f"optim.weight_decay={WEIGHT_DECAY}", f"seed={SEED}",
        f"output_dir={out / 'run'}", *config.overrides,
    ]
    train_job(*load_run_config(overrides))
    rows = [row for row in read_metrics(out / "run") if "loss" in row]
    log.step_end, log.loss = [row["time"] for row in rows], [row["loss"] for row in rows]
    ran = OmegaConf.load(out / "run" / "config.yaml").trainer.mixed_precision  # `auto` as resolved
    return summarize_worker(log, started, model, {"mixed_precision": ran})


def run_trl(config: Config, model: Model, out: Path, started: float) -> dict:
    """Train with TRL's SFTTrainer, changing only the options that `config` names from SFTConfig's defaults."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    log = StepLog()
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model.path, dtype=getattr(torch, DTYPES[config.base_dtype])),
        args=SFTConfig(**trl_arguments(config, model, out)),
        train_dataset=load_dataset("json", data_files=str(model.data), split="train"),
        processing_class=AutoTokenizer.from_pretrained(model.path),
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[step_clock(log)],
    )
    return train_counted(trainer, log, model, started)


def run_trl_dpo(config: Config, model: Model, out: Path, started: float) -> dict:
    """Train with TRL's DPOTrainer from the start adapter, changing only what `config` names from DPOConfig's defaults.

    Given a PEFT model, TRL copies its adapter to a frozen "ref" adapter for the reference, as ftune does with
    `model.adapter`; the adapter starts at B = 0, so that reference is the base in both.
    """
    import torch
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    log = StepLog()
    base = AutoModelForCausalLM.from_pretrained(model.path, dtype=getattr(torch, DTYPES[config.base_dtype]))
    trainer = DPOTrainer(
        model=PeftModel.from_pretrained(base, model.adapter, is_trainable=True),
        args=DPOConfig(**trl_arguments(config, model, out)),
        train_dataset=load_dataset("json", data_files=str(model.data), split="train"),
        processing_class=AutoTokenizer.from_pretrained(model.path), callbacks=[step_clock(log)],
    )
    return train_counted(trainer, log, model, started)


def trl_arguments(config: Config, model: Model, out: Path) -> dict:
    """The training arguments every TRL run shares (ftune's run's), plus what `config` changes from TRL's defaults."""
    options = {"packing": True} if config.batching == "packed" else {}
    sampling = {"grouped": "group_by_length", "ordered": "sequential"}
    options |= {"train_sampling_strategy": sampling[config.batching]} if config.batching in sampling else {}
    options |= {} if config.bf16 else {"bf16": False}
    if config.gradient_checkpointing is not None:
        options["gradient_checkpointing"] = config.gradient_checkpointing
    return dict(
        output_dir=str(out / "run"), max_steps=model.warmup + model.timed, per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=model.grad_accum, learning_rate=LR, lr_scheduler_type="cosine",
        warmup_steps=WARMUP_RATIO,  # transformers 5: a value below 1 is a fraction of the steps
        weight_decay=WEIGHT_DECAY, max_grad_norm=1.0, max_length=model.max_length,
        logging_steps=1, save_strategy="no", report_to="none", seed=SEED, data_seed=SEED, use_cpu=not cuda_available(),
        **options,
    )


def train_counted(trainer, log: StepLog, model: Model, started: float) -> dict:
    """Train a TRL trainer, counting the batches its collator makes, and summarize the run."""
    collate = trainer.data_collator
    trainer.data_collator = lambda rows: log.count(collate(rows))
    trainer.train()
    log.loss = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return summarize_worker(log, started, model, {"mixed_precision": trainer.accelerator.mixed_precision})


def step_clock(log: StepLog):
    """A transformers callback recording when each optimizer step ends."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            log.step_end.append(time.time())

    return StepClock()


def cuda_available() -> bool:
    """Whether a GPU is present: TRL's bf16 default refuses a CPU-only machine unless told `use_cpu`."""
    import torch

    return torch.cuda.is_available()


def worker(args: argparse.Namespace) -> None:
    """Run one configuration and print its figures as one JSON line (the last line of stdout)."""
    config = next(c for c in ALL_CONFIGS if c.name == args.worker)
    model = Model(args.model_name, Path(args.model_path), args.warmup, args.timed, max_length=args.max_length,
                  grad_accum=args.grad_accum, data=Path(args.data), adapter=args.adapter and Path(args.adapter))
    if config.objective == "grpo":
        run = run_ftune_grpo if config.tool == "ftune" else run_trl_grpo
    else:
        run = run_ftune if config.tool == "ftune" else {"sft": run_trl, "dpo": run_trl_dpo}[config.objective]
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["FTUNE_CACHE"] = str(Path(tmp) / "cache")  # time data preparation, not a cache hit
        started = time.time()
        result = run(config, model, Path(tmp), started)
    print(json.dumps(result), flush=True)


def run_config(config: Config, model: Model) -> dict:
    """One configuration in a fresh process."""
    command = [sys.executable, __file__, "--worker", config.name, "--model-name", model.name,
               "--model-path", str(model.path), "--warmup", str(model.warmup), "--timed", str(model.timed),
               "--max-length", str(model.max_length), "--grad-accum", str(model.grad_accum), "--data", str(model.data),
               *(["--adapter", str(model.adapter)] if model.adapter else [])]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"bench: {config.name} on {model.name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


GEMM_SIZES, GEMM_SECONDS = (1024, 2048, 4096), 2.0


def gemm_rates() -> dict:
    """This machine's sustained matmul rate per dtype: the best over sizes and thread counts.

    Each (dtype, n, threads) multiplies two n x n matrices for at least GEMM_SECONDS after a warm-up; its rate
    is the median call's. A single best call overstates a shared machine; one size or one thread count can
    understate it (small sizes do not fill the cores, large ones spill the caches), hence the sweep. Where one
    warm-up call alone takes longer than GEMM_SECONDS (bf16 emulated on a CPU without bf16 instructions: minutes
    at n = 4096), larger sizes of that dtype are skipped.
    """
    import torch

    threads_before = torch.get_num_threads()
    table, best = [], {}
    for name, dtype in (("bf16", torch.bfloat16), ("no", torch.float32)):
        for n in GEMM_SIZES:
            if any(row["dtype"] == name and row["slow"] for row in table):
                break
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            for threads in sorted({1, threads_before, os.cpu_count() or 1}):
                torch.set_num_threads(threads)
                slow = timed_call(lambda: a @ b) > GEMM_SECONDS  # noqa: B023 (the warm-up, called at once)
                times, spent = [], 0.0
                while spent < GEMM_SECONDS:
                    times.append(timed_call(lambda: a @ b))  # noqa: B023 (called at once, in this iteration)
                    spent += times[-1]
                rate = 2 * n**3 / statistics.median(times)
                table.append({"dtype": name, "n": n, "threads": threads, "flops": rate, "slow": slow})
                best[name] = max(best.get(name, 0.0), rate)
    torch.set_num_threads(threads_before)
    return {"best": best, "table": table}


def timed_call(function) -> float:
    """Seconds one call takes."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def ensure_preset_model(cache: Path, preset: str) -> Path:
    """A build_tiny_model.py preset (`small`: ~64M, `base`: ~100M parameters), built once.

    A few pretraining steps only: speed does not depend on the weights.
    """
    path = cache / preset
    if not (path / "config.json").is_file():
        subprocess.run([sys.executable, str(REPO / "scripts" / "build_tiny_model.py"), "--preset", preset,
                        "--tokens", "8192", "--out", str(path)],
                       check=True, cwd=REPO, capture_output=True)
    return path


def ensure_ordered_data(cache: Path, model_path: Path) -> Path:
    """The chat data reordered into length-grouped micro-batches, for tools that read it in order.

    Each tool's own length-grouped sampler draws its own order, so the two would train on other rows, of other
    lengths, in the timed steps. The order is transformers' length grouping (ftune's sampler computes the same),
    seeded by SEED, over the lengths the model's chat template gives each conversation; ftune reads the file
    unshuffled and TRL with `train_sampling_strategy="sequential"`. `identical_batches` checks that every run
    saw the same rows and real tokens per micro-batch.
    """
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from ftune.data.sampler import length_grouped_indices

    path = cache / f"chat_ordered_{model_path.name}.jsonl"  # lengths are the model's tokenizer's
    if not path.is_file():
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        records = [json.loads(line) for line in CHAT_TRAIN.read_text().splitlines()]
        lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)) for r in records]
        order = length_grouped_indices(np.asarray(lengths), MICRO_BATCH, torch.Generator().manual_seed(SEED))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(records[i]) + "\n" for i in order))
    return path


def count_params(path: Path) -> int:
    """Parameters that take part in matmuls (all but untied input embeddings, a lookup), on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    lookup = 0 if embedding is head else embedding.numel()
    return sum(p.numel() for p in model.parameters()) - lookup


def median_results(runs: list[dict]) -> dict:
    """Medians over the repeats of every numeric figure (the mixed precision is the same in each)."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"mixed_precision": runs[0]["mixed_precision"]}


def add_mfu(result: dict, model: Model, rates: dict[str, float]) -> None:
    """MFU against the GEMM rate of the dtype trained in.

    4N FLOPs per real token for LoRA; 6N for DPO, whose reference forward adds 2N.
    """
    flops_per_token = (6 if model.objective == "dpo" else 4) * model.params
    result["mfu"] = flops_per_token * result["real_tokens_per_s"] / rates[result["mixed_precision"]]


def headline(results: dict[str, dict]) -> dict:
    """The ratios the README quotes: ftune's best isolated configuration over TRL's default and best ones."""
    def best(names):
        return max(names, key=lambda n: results[n]["real_tokens_per_s"])

    ftune_best = best([n for n in results if n.startswith("ftune") and results[n]["mixed_precision"] == "bf16"])
    trl_any = best([n for n in results if n.startswith("trl")])
    ftune_rate = results[ftune_best]["real_tokens_per_s"]
    return {
        "ftune_best": ftune_best,
        "trl_best": trl_any,
        "ratio_vs_trl_default": ftune_rate / results["trl_default"]["real_tokens_per_s"],
        "ratio_vs_trl_packed": ftune_rate / results["trl_packed"]["real_tokens_per_s"],
        "ratio_vs_trl_best": ftune_rate / results[trl_any]["real_tokens_per_s"],
        "packing_fill": 1 - results["ftune_packed"]["padding_share"],
        "peak_rss_mb": results[ftune_best]["peak_rss_mb"],
        "trl_peak_rss_mb": results["trl_default"]["peak_rss_mb"],
        "loss_gap_padded": results["ftune_padded"]["final_loss"] - results["trl_default"]["final_loss"],
        "loss_gap_grouped": results["ftune_grouped"]["final_loss"] - results["trl_grouped"]["final_loss"],
    }


def print_table(model: Model, results: dict[str, dict], head: dict) -> None:
    """One rich table per model, and its headline ratios."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{model.name}: {model.params / 1e6:.1f}M params, {model.timed} timed steps (medians)")
    for column in ("config", "dtype", "pairs/s" if model.objective == "dpo" else "real tok/s", "learned tok/s",
                   "padding", "MFU", "first step s", "peak RSS MB", "final loss", "note"):
        table.add_column(column)
    notes = {c.name: c.note for c in ALL_CONFIGS}
    for name, r in results.items():
        rate = f"{r['pairs_per_s']:.2f}" if model.objective == "dpo" else f"{r['real_tokens_per_s']:.0f}"
        table.add_row(name, r["mixed_precision"], rate, f"{r['learned_tokens_per_s']:.0f}",
                      f"{r['padding_share']:.1%}", f"{r['mfu']:.1%}", f"{r['first_step_s']:.1f}",
                      f"{r['peak_rss_mb']:.0f}", f"{r['final_loss']:.3f}", notes[name])
    console = Console(width=160)
    console.print(table)
    console.print({k: round(v, 3) if isinstance(v, float) else v for k, v in head.items()})


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--repeats", type=int, default=3, help="runs per configuration on the tiny model")
    parser.add_argument("--quick", action="store_true", help="tiny model, one repeat, 3 + 5 steps")
    parser.add_argument("--unfused", action="store_true", help="bigvocab: also ftune with the full logits")
    parser.add_argument("--only", choices=("all", "base100m", "profile", "bigvocab", "headloss", "dpo", "grpo"),
                        default="all",
                        help="base100m: ftune's defaults against TRL's fastest on ~100M parameters; profile: where "
                             "ftune's step goes on that model; bigvocab: the 128,256-row vocabulary against TRL; "
                             "headloss: the loss variants alone; dpo: DPO against TRL's DPOTrainer on both models; "
                             "grpo: GRPO against TRL's GRPOTrainer on the tiny model (--quick: 1 repeat, 2 + 3 steps)")
    parser.add_argument("--fp32", action="store_true", help="also run the fp32 pair (ftune grouped, TRL default)")
    parser.add_argument("--bf16-base", action="store_true", help="also run ftune and TRL with a bf16 frozen base")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "ftune-bench")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-name", help=argparse.SUPPRESS)
    parser.add_argument("--model-path", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--timed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help=argparse.SUPPRESS)
    parser.add_argument("--grad-accum", type=int, default=GRAD_ACCUM, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=str(CHAT_TRAIN), help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker:
        return worker(args)
    started = time.time()
    report = {"date": date.today().isoformat(), "machine": machine(), "load_average_start": os.getloadavg()}
    if args.only != "grpo":  # GRPO reports no MFU: no GEMM sweep
        gemm = gemm_rates()
        rates = gemm["best"]
        report["gemm"] = gemm
        print(f"GEMM (best sustained): bf16 {rates['bf16'] / 1e9:.0f}, fp32 {rates['no'] / 1e9:.0f} GFLOP/s",
              flush=True)
    if args.only == "grpo":
        report["models"] = {"tiny_grpo": bench_grpo(1 if args.quick else args.repeats, args.quick)}
    elif args.only == "headloss":
        report["head_loss"] = bench_head_loss()
    elif args.only == "base100m":
        path = ensure_preset_model(args.cache, "base")
        model = Model("base100m", path, warmup=1, timed=3, data=ensure_ordered_data(args.cache, path))
        report["models"] = {"base100m": bench_model(model, BASE_CONFIGS, args.repeats, rates, base_headline)}
    elif args.only == "profile":
        path = ensure_preset_model(args.cache, "base")
        model = Model("base100m", path, warmup=1, timed=2, data=ensure_ordered_data(args.cache, path))
        names = ("ftune_default", "ftune_no_cpu_kernels")
        report["profile"] = {name: profile_step(model, name) for name in names}
    elif args.only == "dpo":
        report["models"] = bench_dpo(args.cache, args.repeats, rates)
    elif args.only == "bigvocab":
        model = Model("bigvocab", ensure_big_vocab_model(args.cache), warmup=1, timed=2, max_length=1024,
                      grad_accum=1, data=ensure_long_texts(args.cache))
        configs = BIG_VOCAB_CONFIGS if args.unfused else BIG_VOCAB_CONFIGS[:2]
        report["models"] = {"bigvocab": bench_model(model, configs, args.repeats, rates, big_vocab_headline)}
    else:
        models = [Model("tiny", TINY_MODEL, warmup=3, timed=5 if args.quick else 12)]  # ~20 min in all on 2 cores
        if not args.quick:
            models.append(Model("small", ensure_preset_model(args.cache, "small"), warmup=1, timed=4))
        configs = (CONFIGS + ([] if args.quick else COMPILED_CONFIGS) + (BF16_BASE_CONFIGS if args.bf16_base else [])
                   + (FP32_CONFIGS if args.fp32 else []))
        report["models"] = {}
        for model in models:
            repeats = 1 if args.quick else (args.repeats if model.name == "tiny" else max(1, args.repeats - 1))
            chosen = [c for c in configs if not (c.compile and model.name != "tiny")]  # compiling 64M: minutes
            report["models"][model.name] = bench_model(model, chosen, repeats, rates, headline)
        report |= {k: report["models"]["tiny"][k] for k in headline_keys()}
    report["load_average_end"] = os.getloadavg()
    report["wall_s"] = round(time.time() - started, 1)
    if args.json:
        write_report(args.json, report, args.only)
    print(f"done in {report['wall_s']:.0f}s; load average {report['load_average_end'][0]:.1f} at the end")


def bench_model(model: Model, configs: list[Config], repeats: int, rates: dict, head_of,
                same_batches=None) -> dict:
    """Every configuration on one model, `repeats` times with the order rotated; medians, MFU and headline.

    `same_batches(runs)` says whether every run trained on the same batches (`identical_batches` by default).
    """
    model.params = count_params(model.path)
    runs = rotated_runs(model, configs, repeats, lambda r: f"{r['real_tokens_per_s']:.0f} real tok/s")
    results = {name: median_results(r) for name, r in runs.items()}
    for result in results.values():
        add_mfu(result, model, rates)
    head = head_of(results) | {"identical_batches": (same_batches or identical_batches)(runs)}
    print_table(model, results, head)
    return {"params": model.params, "warmup_steps": model.warmup, "timed_steps": model.timed, "repeats": repeats,
            "results": results, "runs": runs, **head}


def rotated_runs(model: Model, configs: list[Config], repeats: int, rate) -> dict[str, list[dict]]:
    """Every configuration `repeats` times, each run its own process, the order rotated repeat by repeat.

    `rate(result)` is the figure printed after each run, with its peak RSS.
    """
    runs: dict[str, list[dict]] = {c.name: [] for c in configs}
    for repeat in range(repeats):
        for config in configs[repeat % len(configs):] + configs[: repeat % len(configs)]:  # rotate the order
            runs[config.name].append(run_config(config, model))
            print(f"{model.name} repeat {repeat + 1}/{repeats} {config.name}: {rate(runs[config.name][-1])}, "
                  f"peak RSS {runs[config.name][-1]['peak_rss_mb']:.0f} MB", flush=True)
    return runs


def identical_batches(runs: dict[str, list[dict]]) -> bool:
    """Whether every run of every configuration trained on micro-batches of the same sequences and real tokens."""
    return len({tuple(map(tuple, run["batches"])) for config_runs in runs.values() for run in config_runs}) == 1


def base_headline(results: dict[str, dict]) -> dict:
    """The ~100M target: ftune's defaults at least 1.3x TRL's fastest configuration in real tokens/s."""
    trl_best = max((n for n in results if n.startswith("trl")), key=lambda n: results[n]["real_tokens_per_s"])
    ratio = results["ftune_default"]["real_tokens_per_s"] / results[trl_best]["real_tokens_per_s"]
    default = results["ftune_default"]["real_tokens_per_s"]
    return {"trl_best": trl_best, "ratio_vs_trl_best": ratio, "speed_target_met": ratio >= 1.3,
            "default_over_no_cpu_kernels": default / results["ftune_no_cpu_kernels"]["real_tokens_per_s"],
            "no_dropout_over_default": results["ftune_default_no_dropout"]["real_tokens_per_s"] / default}


PROFILE_ROWS = 15


def profile_step(model: Model, config_name: str) -> dict:
    """The operators taking the most self CPU time in a run of ftune's `config_name` configuration on `model`.

    Profiled in this process over the whole run (setup included, so data preparation shows too).
    """
    from torch.profiler import ProfilerActivity, profile

    config = next(c for c in BASE_CONFIGS if c.name == config_name)
    with tempfile.TemporaryDirectory() as tmp, profile(activities=[ProfilerActivity.CPU]) as prof:
        os.environ["FTUNE_CACHE"] = str(Path(tmp) / "cache")
        run_ftune(config, model, Path(tmp), time.time())
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    rows = [{"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events[:PROFILE_ROWS]]
    for row in rows:
        print(f"{row['op']:<48} {row['self_s']:8.2f} s {row['share']:6.1%} {row['calls']:>8}", flush=True)
    return {"model": model.name, "config": config_name, "total_self_s": total / 1e6, "top": rows}


def big_vocab_headline(results: dict[str, dict]) -> dict:
    """The large-vocabulary targets: ftune's peak RSS at most 0.6x TRL's, its tokens/s at least 2x."""
    ftune, trl = results["ftune_bigvocab"], results["trl_bigvocab"]
    rss = ftune["peak_rss_mb"] / trl["peak_rss_mb"]
    speed = ftune["real_tokens_per_s"] / trl["real_tokens_per_s"]
    head = {"rss_ratio_vs_trl": rss, "speed_ratio_vs_trl": speed, "rss_target_met": rss <= 0.6,
            "speed_target_met": speed >= 2.0}
    if unfused := results.get("ftune_bigvocab_unfused"):
        head["unfused_rss_ratio_vs_trl"] = unfused["peak_rss_mb"] / trl["peak_rss_mb"]
    return head


def bench_dpo(cache: Path, repeats: int, rates: dict) -> dict:
    """DPO against TRL on the ~100M model (the shipped pairs) and on the 128,256-row vocabulary (long pairs).

    Both tools train the same LoRA from the same start adapter (`ensure_start_adapter`), on the same pairs in the
    file's order, 4 pairs per micro-batch; `loss_parity` compares their per-step losses.
    """
    base, big = ensure_preset_model(cache, "base"), ensure_big_vocab_model(cache)
    models = {
        1.3: Model("dpo_base100m", base, warmup=1, timed=3, data=PAIRS_TRAIN, adapter=ensure_start_adapter(cache, base),
                   objective="dpo"),
        1.5: Model("dpo_bigvocab", big, warmup=1, timed=2, max_length=1024, grad_accum=1,
                   data=ensure_long_pairs(cache), adapter=ensure_start_adapter(cache, big), objective="dpo"),
    }
    configs, skipped = dpo_configs(rates)
    report = {}
    for speed_target, model in models.items():
        result = bench_model(model, configs, repeats, rates,
                             lambda results, target=speed_target: dpo_headline(results, target), same_pairs)
        report[model.name] = result | loss_parity(result["runs"]) | {"skipped": skipped}
        print({k: v for k, v in report[model.name].items() if k.startswith(("loss", "first"))}, flush=True)
    return report


EMULATED_BF16 = 0.1
"""bf16 GEMM slower than this share of fp32's: the CPU has no bf16 instructions and torch emulates them."""


def dpo_configs(rates: dict) -> tuple[list[Config], dict[str, str]]:
    """DPO_CONFIGS, less TRL's bf16 autocast ones where bf16 is emulated (and why, for the report).

    There a bf16 matmul runs at a few percent of fp32's rate (this machine's GEMM sweep), so a TRL bf16 step
    takes tens of minutes: it cannot be TRL's fastest, and ftune's `auto` does not use bf16 there either.
    """
    if rates["bf16"] >= EMULATED_BF16 * rates["no"]:
        return DPO_CONFIGS, {}
    reason = (f"bf16 emulated on this CPU: GEMM {rates['bf16'] / 1e9:.1f} against {rates['no'] / 1e9:.0f} GFLOP/s "
              "in fp32")
    return [c for c in DPO_CONFIGS if c.tool != "trl" or c.bf16 is False], \
        {c.name: reason for c in DPO_CONFIGS if c.tool == "trl" and c.bf16 is not False}


def dpo_headline(results: dict[str, dict], speed_target: float) -> dict:
    """The DPO targets: ftune's pairs/s over TRL's fastest configuration, its peak RSS over TRL's lowest."""
    trl = {name: r for name, r in results.items() if name.startswith("trl")}
    fastest = max(trl, key=lambda name: trl[name]["pairs_per_s"])
    leanest = min(trl, key=lambda name: trl[name]["peak_rss_mb"])
    ftune = results["ftune_dpo"]
    speed, rss = ftune["pairs_per_s"] / trl[fastest]["pairs_per_s"], ftune["peak_rss_mb"] / trl[leanest]["peak_rss_mb"]
    two_rows = results.get("ftune_dpo_two_rows")  # pref.share_prompt=false: what sharing the prompt's row buys
    return {"trl_fastest": fastest, "speed_ratio_vs_trl_fastest": speed, "speed_target": speed_target,
            "speed_target_met": speed >= speed_target, "trl_leanest": leanest, "rss_ratio_vs_trl_leanest": rss,
            "rss_target_met": rss <= 0.5,
            "two_rows_speed_ratio_vs_trl_fastest": two_rows and two_rows["pairs_per_s"] / trl[fastest]["pairs_per_s"]}


def loss_parity(runs: dict[str, list[dict]]) -> dict:
    """The first step's loss against ln 2, and the largest per-step loss gap between ftune and TRL.

    Against each TRL configuration in ftune's mixed precision, on identical batches (`identical_batches`).
    """
    ftune = runs["ftune_dpo"][0]
    gaps = {name: max(abs(a - b) for a, b in zip(ftune["losses"], config_runs[0]["losses"], strict=True))
            for name, config_runs in runs.items()
            if name.startswith("trl") and config_runs[0]["mixed_precision"] == ftune["mixed_precision"]}
    return {"first_loss_ftune": ftune["losses"][0], "first_loss_minus_ln2": ftune["losses"][0] - math.log(2),
            "first_loss_trl": {name: r[0]["losses"][0] for name, r in runs.items() if name.startswith("trl")},
            "loss_gap_max_same_precision": gaps}


def same_pairs(runs: dict[str, list[dict]]) -> bool:
    """Whether every run trained on micro-batches of the same pairs (sequences and their tokens, less TRL's extra one).

    TRL's completion is the conversation's tokens after the prompt's, so it ends with what the chat template writes
    after the end-of-turn (ChatML's newline after <|im_end|>) and scores that token too; ftune's response ends at
    the end-of-turn token (`ftune.data.preference`). The bench's models share ChatML, where that is one token.
    """
    def ftune_view(name: str, batches: list) -> tuple:
        return tuple((sequences, tokens - sequences if name.startswith("trl") else tokens)
                     for sequences, tokens in batches)

    return len({ftune_view(name, run["batches"]) for name, config_runs in runs.items() for run in config_runs}) == 1


class PhaseClock:
    """Seconds spent in named calls (`generate`, the reward functions, the loss, ...), with when each call ended.

    `wrap(phase, function)` returns the function timed; a call made inside another call of the same phase
    counts once (the outer one). The bench's GRPO workers patch each tool's functions with it, in their own
    process only.
    """

    def __init__(self) -> None:
        self.calls: dict[str, list[tuple[float, float]]] = {}
        self.running: set[str] = set()

    def wrap(self, phase: str, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            if phase in self.running:
                return function(*args, **kwargs)
            self.running.add(phase)
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.running.discard(phase)
                self.calls.setdefault(phase, []).append((time.time(), time.perf_counter() - start))

        return timed

    def patch(self, owner, name: str, phase: str) -> None:
        """Time `owner.name` (a class's method or a module's function) as `phase` from now on."""
        setattr(owner, name, self.wrap(phase, getattr(owner, name)))

    def per_step(self, step_end: list[float]) -> dict[str, list[float]]:
        """Each phase's seconds in each step: a call belongs to the first step that ends after it."""
        steps = {}
        for phase, calls in self.calls.items():
            seconds = [0.0] * len(step_end)
            for end, spent in calls:
                index = bisect.bisect_left(step_end, end)
                if index < len(seconds):
                    seconds[index] += spent
            steps[phase] = seconds
        return steps


@dataclass
class GrpoLog:
    """What a GRPO worker records: when each step ends, each step's prompts, the phases' seconds."""

    step_end: list[float] = field(default_factory=list)
    prompts: list[list[str]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    clock: PhaseClock = field(default_factory=PhaseClock)

    def time_generate(self) -> None:
        """Time transformers' `generate` (both tools sample with it) and count the positions each call decodes.

        A batch decodes until its longest completion ends, so its time follows the longest, not the mean.
        """
        import torch
        from transformers.generation.utils import GenerationMixin

        generate = GenerationMixin.generate

        def counted(model, *args, **kwargs):
            output = generate(model, *args, **kwargs)
            prompt = kwargs.get("input_ids", args[0] if args else None)
            if isinstance(output, torch.Tensor) and prompt is not None:
                self.positions.append(output.size(1) - prompt.size(1))
            return output

        GenerationMixin.generate = self.clock.wrap("generate", counted)

    def record_prompts(self, prompts: list) -> None:
        """The prompts a reward call scores, one per group (each comes `GRPO_GENERATIONS` times in a row)."""
        self.prompts.append([p[-1]["content"] if isinstance(p, list) else p for p in prompts[::GRPO_GENERATIONS]])


GRPO_PHASES = ("generate", "reward", "rollout_other", "forward", "backward", "other")
"""A GRPO step's seconds: sampling, the reward functions, the rest of the rollout (decoding, advantages, the
training rows), the training forward with its loss, the backward, and the rest (clipping, AdamW, logging)."""


def summarize_grpo(log: GrpoLog, started: float, model: Model, rewards: list[float], lengths: list[float],
                   extra: dict) -> dict:
    """Completions and completion tokens per second over the timed steps, the rewards, and each step's split."""
    steps, warmup = len(log.step_end), model.warmup
    seconds = log.step_end[-1] - log.step_end[warmup - 1]
    completions = GRPO_PROMPTS * GRPO_GENERATIONS
    step_seconds = [end - start for start, end in zip([started, *log.step_end], log.step_end, strict=False)]
    timed = log.clock.per_step(log.step_end)
    zero = [0.0] * steps
    split = {"generate": timed.get("generate", zero), "reward": timed.get("reward", zero),
             "forward": timed.get("forward", zero), "backward": timed.get("backward", zero)}
    split["rollout_other"] = [r - g - w for r, g, w in zip(timed.get("rollout", zero), split["generate"],
                                                           split["reward"], strict=True)]
    split["other"] = [s - r - f - b for s, r, f, b in zip(step_seconds, timed.get("rollout", zero), split["forward"],
                                                          split["backward"], strict=True)]
    return {
        "steps": steps,
        "completions_per_s": completions * (steps - warmup) / seconds,
        "completion_tokens_per_s": completions * sum(lengths[warmup:]) / seconds,
        "step_s": seconds / (steps - warmup),
        **{f"{phase}_s": statistics.mean(split[phase][warmup:]) for phase in GRPO_PHASES},
        "mean_completion_length": statistics.mean(lengths[warmup:]),
        "decoded_positions": statistics.mean(log.positions[warmup:]) if len(log.positions) == steps else math.nan,
        "generate_s_per_position": sum(split["generate"][warmup:]) / sum(log.positions[warmup:])
        if len(log.positions) == steps else math.nan,
        "reward_first": statistics.mean(rewards[:GRPO_REWARD_STEPS]),
        "reward_last": statistics.mean(rewards[-GRPO_REWARD_STEPS:]),
        "first_step_s": log.step_end[0] - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average_end": os.getloadavg()[0],  # another process's load slows a run: compare with the cores
        "rewards": rewards, "completion_lengths": lengths, "prompts": log.prompts,
        "split": {phase: split[phase] for phase in GRPO_PHASES},
        **extra,
    }


def grpo_reward_funcs() -> list:
    """The shipped task's reward functions, imported from their file (what ftune's recipe names)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tinyworld_tense", GRPO_REWARDS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return [getattr(module, name) for name in GRPO_REWARD_WEIGHTS]


def run_ftune_grpo(config: Config, model: Model, out: Path, started: float) -> dict:
    """`ftune train recipe=tiny_grpo` in this process, the prompts in the file's order, its phases timed."""
    from accelerate import Accelerator

    import ftune.train.objectives.grpo as grpo
    from ftune.commands.train import train_job
    from ftune.config.compose import load_run_config
    from ftune.train.artefacts import read_metrics

    log = GrpoLog()
    build_loader, score = grpo.build_prompt_loader, grpo.score

    def in_file_order(*args, **kwargs):  # the file's order, as TRL reads it with shuffle_dataset=False
        bound = inspect.signature(build_loader).bind(*args, **kwargs)
        bound.arguments["shuffle"] = False
        return build_loader(*bound.args, **bound.kwargs)

    def scored(*args, **kwargs):
        log.record_prompts(inspect.signature(score).bind(*args, **kwargs).arguments["prompts"])
        return score(*args, **kwargs)

    grpo.build_prompt_loader, grpo.score = in_file_order, log.clock.wrap("reward", scored)
    log.time_generate()
    log.clock.patch(grpo.GrpoObjective, "prepare_step", "rollout")
    log.clock.patch(grpo.GrpoObjective, "loss", "forward")
    log.clock.patch(Accelerator, "backward", "backward")
    funcs = ",".join(f"'{GRPO_REWARDS}:{name}'" for name in GRPO_REWARD_WEIGHTS)
    overrides = [
        "recipe=tiny_grpo", f"model.name_or_path={model.path}", "model.dtype=fp32",
        "model.gradient_checkpointing=false", f"data.path={model.data}", "data.eval_path=null", "probe.path=null",
        *[f"lora.{key}={value}" for key, value in LORA.items()],
        f"grpo.reward_funcs=[{funcs}]", f"grpo.reward_weights=[{','.join(map(str, GRPO_REWARD_WEIGHTS.values()))}]",
        f"grpo.num_generations={GRPO_GENERATIONS}", f"grpo.max_completion_length={GRPO_COMPLETION_LENGTH}",
        "grpo.temperature=1.0", "grpo.top_p=1.0", "grpo.beta=0.0", "grpo.loss=dapo", f"grpo.epsilon={GRPO_EPSILON}",
        f"trainer.max_steps={model.warmup + model.timed}", f"trainer.micro_batch_size={GRPO_PROMPTS}",
        "trainer.grad_accum=1", "trainer.eval_every=0", "trainer.save_every=0", "trainer.log_every=1",
        "trainer.sample_every=0", "trainer.final_weights=last", "trainer.mixed_precision=no", "trainer.compile=false",
        f"optim.lr={GRPO_LR}", "optim.warmup_ratio=0.0", "optim.scheduler=constant", "optim.weight_decay=0.0",
        "optim.max_grad_norm=1.0", f"seed={SEED}", f"output_dir={out / 'run'}", *config.overrides,
    ]
    train_job(*load_run_config(overrides))
    rows = [row for row in read_metrics(out / "run") if "loss" in row]
    log.step_end = [row["time"] for row in rows]
    summary = json.loads((out / "run" / "summary.json").read_text())
    return summarize_grpo(log, started, model, [row["reward"] for row in rows],
                          [row["completion_length"] for row in rows],
                          {"mixed_precision": "no", "trainable_params": summary["trainable_params"]})


def run_trl_grpo(config: Config, model: Model, out: Path, started: float) -> dict:
    """TRL's GRPOTrainer on what ftune's run trains (see the module docstring), its phases timed."""
    import torch
    from accelerate import Accelerator
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    log = GrpoLog()
    calculate = GRPOTrainer._calculate_rewards

    def scored(self, inputs, prompts, *args, **kwargs):
        log.record_prompts(prompts)
        return calculate(self, inputs, prompts, *args, **kwargs)

    GRPOTrainer._calculate_rewards = log.clock.wrap("reward", scored)
    log.time_generate()
    log.clock.patch(GRPOTrainer, "_generate_and_score_completions", "rollout")
    log.clock.patch(GRPOTrainer, "compute_loss", "forward")
    log.clock.patch(Accelerator, "backward", "backward")
    args = GRPOConfig(
        output_dir=str(out / "run"), max_steps=model.warmup + model.timed, seed=SEED, data_seed=SEED,
        per_device_train_batch_size=GRPO_PROMPTS * GRPO_GENERATIONS,  # TRL counts completions
        gradient_accumulation_steps=1, num_generations=GRPO_GENERATIONS,
        max_completion_length=GRPO_COMPLETION_LENGTH, temperature=1.0, top_p=1.0, beta=0.0, loss_type="dapo",
        epsilon=GRPO_EPSILON, reward_weights=list(GRPO_REWARD_WEIGHTS.values()), learning_rate=GRPO_LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=False,
        gradient_checkpointing=False, use_vllm=False, disable_dropout=True, shuffle_dataset=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", use_cpu=not cuda_available(),
    )
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32),
        reward_funcs=grpo_reward_funcs(), args=args,
        train_dataset=load_dataset("json", data_files=str(model.data), split="train"),
        processing_class=AutoTokenizer.from_pretrained(model.path),
        peft_config=LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                               target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[step_clock(log)],
    )
    trainer.train()
    rows = [row for row in trainer.state.log_history if "loss" in row]
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return summarize_grpo(log, started, model, [row["reward"] for row in rows],
                          [row["completions/mean_length"] for row in rows],
                          {"mixed_precision": trainer.accelerator.mixed_precision, "trainable_params": trainable})


def bench_grpo(repeats: int, quick: bool) -> dict:
    """GRPO, ftune's against TRL's GRPOTrainer, on the embedded model and the shipped prompts (module docstring)."""
    model = Model("tiny_grpo", TINY_MODEL, warmup=GRPO_WARMUP, timed=3 if quick else 10, grad_accum=1,
                  data=PROMPTS_TRAIN, objective="grpo")
    model.params = count_params(model.path)
    runs = rotated_runs(model, GRPO_CONFIGS, repeats,
                        lambda r: f"{r['completions_per_s']:.2f} completions/s ({r['step_s']:.2f} s/step, "
                                  f"generate {r['generate_s']:.2f} s), reward {r['reward_first']:.2f} -> "
                                  f"{r['reward_last']:.2f}")
    results = {name: median_results(r) for name, r in runs.items()}
    head = grpo_headline(results) | {"same_prompts": same_prompts(runs), "same_trainable_params": len(
        {run["trainable_params"] for config_runs in runs.values() for run in config_runs}) == 1}
    print_grpo_table(model, results, head)
    return {"params": model.params, "warmup_steps": model.warmup, "timed_steps": model.timed, "repeats": repeats,
            "completions_per_step": GRPO_PROMPTS * GRPO_GENERATIONS, "results": results, "runs": runs, **head}


def grpo_headline(results: dict[str, dict]) -> dict:
    """The GRPO targets: ftune's completions/s at least 1.5x TRL's, its peak RSS no higher."""
    ftune, trl = results["ftune_grpo"], results["trl_grpo"]
    speed, rss = ftune["completions_per_s"] / trl["completions_per_s"], ftune["peak_rss_mb"] / trl["peak_rss_mb"]
    return {"speed_ratio_vs_trl": speed, "speed_target": GRPO_SPEED_TARGET,
            "speed_target_met": speed >= GRPO_SPEED_TARGET,
            "completion_tokens_ratio_vs_trl": ftune["completion_tokens_per_s"] / trl["completion_tokens_per_s"],
            "rss_ratio_vs_trl": rss, "rss_target_met": rss <= 1.0,
            # the same work per unit: each tool samples its own completions, so their lengths part as they train
            "generate_per_position_ratio_vs_trl": trl["generate_s_per_position"] / ftune["generate_s_per_position"],
            "train_ratio_vs_trl": (trl["forward_s"] + trl["backward_s"]) / (ftune["forward_s"] + ftune["backward_s"])}


def same_prompts(runs: dict[str, list[dict]]) -> bool:
    """Whether every run's steps sampled completions of the same prompts, in the same order."""
    return len({tuple(map(tuple, run["prompts"])) for config_runs in runs.values() for run in config_runs}) == 1


def print_grpo_table(model: Model, results: dict[str, dict], head: dict) -> None:
    """The GRPO runs' medians, each step's seconds split by phase, and the headline ratios."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"GRPO on {model.name}: {model.params / 1e6:.1f}M params, {GRPO_PROMPTS} prompts x "
                        f"{GRPO_GENERATIONS} completions per step, {model.timed} timed steps (medians)")
    for column in ("config", "compl/s", "compl tok/s", "s/step", *(f"{p} s" for p in GRPO_PHASES), "peak RSS MB",
                   "mean length", "decoded", "reward first -> last"):
        table.add_column(column)
    for name, r in results.items():
        table.add_row(name, f"{r['completions_per_s']:.2f}", f"{r['completion_tokens_per_s']:.0f}",
                      f"{r['step_s']:.2f}", *(f"{r[f'{p}_s']:.3f}" for p in GRPO_PHASES), f"{r['peak_rss_mb']:.0f}",
                      f"{r['mean_completion_length']:.1f}", f"{r['decoded_positions']:.1f}",
                      f"{r['reward_first']:.3f} -> {r['reward_last']:.3f}")
    console = Console(width=180)
    console.print(table)
    console.print({k: round(v, 3) if isinstance(v, float) else v for k, v in head.items()})


def ensure_start_adapter(cache: Path, model_path: Path) -> Path:
    """A fresh LoRA (r 8, alpha 16, no dropout, all linear layers; B = 0) that both tools start DPO from.

    Each tool draws its own random A, so losses would part after the first step; one saved adapter makes the runs
    comparable step by step. Its B is zero, so the policy starts equal to the base, which is the reference.
    """
    path = cache / f"start_adapter_{model_path.name}"
    if not (path / "adapter_config.json").is_file():
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(SEED)
        lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
        get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), lora).save_pretrained(path)
    return path


def ensure_long_pairs(cache: Path, pairs: int = 64, prompt_words: int = 100, response_words: int = 80) -> Path:
    """The shipped pairs lengthened for the large vocabulary (~300 tokens per sequence).

    A passage of the shipped chat turns goes before each request and before each response (chosen and rejected
    each their own).
    """
    path = cache / "long_pairs.jsonl"
    if not path.is_file():
        stream = " ".join(m["content"] for line in CHAT_TRAIN.read_text().splitlines()
                          for m in json.loads(line)["messages"]).split()

        def after_passage(message: dict, start: int, words: int) -> dict:
            passage = " ".join(stream[(start + j) % len(stream)] for j in range(words))
            return message | {"content": f"{passage}\n\n{message['content']}"}

        rows = []
        for i, line in enumerate(PAIRS_TRAIN.read_text().splitlines()[:pairs]):
            pair, at = json.loads(line), 3 * i * prompt_words
            *context, request = pair["prompt"]
            rows.append({"prompt": [*context, after_passage(request, at, prompt_words)],
                         "chosen": [after_passage(pair["chosen"][0], at + prompt_words, response_words)],
                         "rejected": [after_passage(pair["rejected"][0], at + 2 * prompt_words, response_words)]})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_report(path: Path, report: dict, only: str) -> None:
    """Write the report; a partial run (`--only`) updates its own sections of an existing file."""
    existing = json.loads(path.read_text()) if path.is_file() and only != "all" else {}
    if only != "all":
        models = existing.get("models", {}) | report.pop("models", {})
        own = ("date", "wall_s", "machine", "gemm")  # a partial run's own: the others' keep theirs
        report = existing | {f"{k}_{only}" if k.startswith("load_average") or k in own else k: v
                             for k, v in report.items()} | ({"models": models} if models else {})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def ensure_big_vocab_model(cache: Path) -> Path:
    """A random 2-layer Llama with Llama-3's 128,256-row vocabulary, with the embedded model's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = cache / "bigvocab"
    if not (path / "config.json").is_file():
        import torch

        torch.manual_seed(SEED)
        LlamaForCausalLM(LlamaConfig(**BIG_VOCAB)).save_pretrained(path)
        AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(path)
    return path


def ensure_long_texts(cache: Path, documents: int = 64, words: int = 1600) -> Path:
    """`text` documents longer than 1,024 tokens (the shipped chat turns, concatenated), so every row is full."""
    path = cache / "long_texts.jsonl"
    if not path.is_file():
        turns = [m["content"] for line in CHAT_TRAIN.read_text().splitlines() for m in json.loads(line)["messages"]]
        stream = " ".join(turns).split()
        texts = [" ".join(stream[(i * words + j) % len(stream)] for j in range(words)) for i in range(documents)]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))  # wraps around the turns
    return path


def bench_head_loss(tokens: int = 1024, repeats: int = 2) -> dict:
    """Forward + backward of the head and loss alone at the large-vocabulary shape (bf16 matmuls, frozen head).

    The unfused loss against the chunked one, gradient precomputed in the forward or recomputed in the backward.
    Seconds are the best of `repeats`; peak is the process's resident high-water mark during the call.
    """
    import torch
    import torch.nn.functional as F

    from ftune.train.chunked import ChunkSpec, LinearHead, chunked_loss

    torch.manual_seed(SEED)
    hidden = torch.randn(tokens, BIG_VOCAB["hidden_size"], requires_grad=True)
    weight = torch.randn(BIG_VOCAB["vocab_size"], BIG_VOCAB["hidden_size"]) * 0.02
    targets = torch.randint(0, BIG_VOCAB["vocab_size"], (tokens,))

    def unfused():
        logits = (hidden.to(torch.bfloat16) @ weight.to(torch.bfloat16).T).float()
        return F.cross_entropy(logits, targets, reduction="sum")

    def chunked(size: int, recompute: bool):
        head = LinearHead((hidden,), (weight,), None, torch.bfloat16)
        return lambda: chunked_loss(head, targets, ChunkSpec(size, recompute))["loss"]

    cases = {"unfused": unfused, "precomputed_256": chunked(256, False), "recompute_256": chunked(256, True),
             "precomputed_1024": chunked(1024, False), "recompute_1024": chunked(1024, True)}
    results: dict[str, dict] = {name: {"seconds": math.inf, "peak_rss_mb": 0.0} for name in cases}
    for _ in range(repeats):
        for name, loss in cases.items():
            hidden.grad = None
            reset_peak_rss()
            seconds = timed_call(lambda: loss().backward())  # noqa: B023 (called at once)
            results[name] = {"seconds": min(results[name]["seconds"], seconds),
                             "peak_rss_mb": max(results[name]["peak_rss_mb"], peak_rss_mb())}
    for name, r in results.items():
        print(f"head loss {name}: {r['seconds']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    return {"tokens": tokens, "shape": BIG_VOCAB, "results": results}


def reset_peak_rss() -> None:
    """Reset this process's resident high-water mark (Linux: VmHWM) to its current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    """This process's resident high-water mark since the last reset, in MB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def headline_keys() -> tuple[str, ...]:
    """Top-level JSON keys, taken from the tiny model (the default run's model)."""
    return ("ratio_vs_trl_default", "ratio_vs_trl_packed", "ratio_vs_trl_best", "packing_fill", "peak_rss_mb")


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    from ftune.model.dtypes import cpu_has_bf16

    names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")] if Path("/proc/cpuinfo").is_file() else []
    return {"cpu": platform.processor() or platform.machine(), "model": names[0] if names else "unknown",
            "native_bf16": cpu_has_bf16(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "trl": trl_version()}


def trl_version() -> str:
    import trl

    return trl.__version__


if __name__ == "__main__":
    main()
