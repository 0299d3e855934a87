"""What users ask first on a GPU: speed and peak memory of LoRA and QLoRA steps at real model shapes.

ftune against TRL, next to `ftune plan`'s estimate; and whether packed rows give the unpacked loss.

    python scripts/gpu_check.py --out results/gpu            # a CUDA machine: Llama-3-8B and Qwen2.5-7B shapes
    python scripts/gpu_check.py --cpu-smoke --out /tmp/smoke  # the same code on a tiny random Llama, on CPU (CI)

The models have the real shapes (the shipped `configs/hub` configs) and random weights, built on the device
from the config: nothing is downloaded, and speed and memory do not depend on the weights. QLoRA quantizes
the random bf16 linears to NF4 with bitsandbytes, layer by layer, as loading a checkpoint would. ftune's step is
its own: `prepare_quantized`, `add_adapter`, `build_optimizer`, `build_step_loss` (the chunked loss), bf16
autocast, clipping. TRL's is SFTTrainer on the same random model and the same token batches.

Peak memory is `torch.cuda.max_memory_allocated` over the timed steps (on CPU, not measured); `ftune plan`'s
estimate excludes the CUDA context and allocator slack, which this does not see either. Packing: one batch of
random documents, packed into rows with ftune's block-diagonal masks (position ids under flash-attention 2,
where installed) against the same documents padded; the per-token losses must agree.
Everything lands in `OUT/summary.json` (and a table on stdout).
"""

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"llama3_8b": "llama3_8b", "qwen2_5_7b": "qwen2_5_7b"}
"""Model name -> the config group (configs/model) whose hub config gives the real shape."""
RECIPES = {"lora": "lora_7b", "qlora": "qlora_7b"}
SMOKE_SHAPE = {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}


def run_config(model_name: str, method: str, seq_len: int, micro_batch: int, smoke_dir: Path | None):
    """The recipe's typed config with this model (or the smoke model's directory) and batch."""
    sys.path.insert(0, str(REPO))
    from ftune.config.compose import load_run_config

    model = [f"model.name_or_path={smoke_dir}", "model.dtype=fp32"] if smoke_dir else [f"model={SHAPES[model_name]}"]
    overrides = [f"recipe={RECIPES[method]}", *model, f"data.max_length={seq_len}",
                 f"trainer.micro_batch_size={micro_batch}", "trainer.mixed_precision=bf16",
                 *[f"lora.{k}={v}" for k, v in LORA.items()]]
    return load_run_config(overrides)[0]


def random_model(cfg, device: torch.device, quantize: bool):
    """The config's model with random weights, built directly on `device` (4-bit NF4 linears for QLoRA)."""
    from transformers import AutoModelForCausalLM

    from ftune.model.dtypes import DTYPES
    from ftune.plan.meta import load_model_config

    config = load_model_config(cfg.model.name_or_path)  # a directory, or a shipped public config
    config._attn_implementation = attention(device)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.model.dtype])
    model.config.use_cache = False
    if quantize:
        quantize_linears(model, cfg.quant.double_quant)
    return model


def attention(device: torch.device) -> str:
    """flash-attention 2 on CUDA where installed, else SDPA."""
    if device.type == "cuda":
        with contextlib.suppress(ImportError):
            import flash_attn  # noqa: F401

            return "flash_attention_2"
    return "sdpa"


def quantize_linears(model, double_quant: bool) -> None:
    """Replace every decoder linear by a bitsandbytes NF4 one holding the same (random) weights.

    transformers quantizes only while loading a checkpoint; with no checkpoint, the swap is written out here,
    one layer at a time so the bf16 copy of only one linear exists beside the 4-bit model.
    """
    import bitsandbytes as bnb

    from ftune.plan.meta import decoder_of

    for layer in decoder_of(model).layers:
        for name, module in list(layer.named_modules()):
            if not isinstance(module, torch.nn.Linear):
                continue
            parent = layer.get_submodule(name.rpartition(".")[0]) if "." in name else layer
            quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                          compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
            quantized.weight = bnb.nn.Params4bit(module.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                                 compress_statistics=double_quant).to(module.weight.device)
            if module.bias is not None:
                quantized.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
            setattr(parent, name.rpartition(".")[2], quantized)


def ftune_steps(cfg, device: torch.device, steps: int, seed: int = 0) -> dict:
    """Timed training steps through ftune's own model preparation, optimizer and (chunked) loss."""
    from ftune.model.adapters import add_adapter
    from ftune.model.quant import prepare_quantized
    from ftune.train.losses import build_step_loss
    from ftune.train.optim import build_optimizer

    model = random_model(cfg, device, quantize=cfg.quant.bits == 4)
    if cfg.quant.bits == 4:
        model = prepare_quantized(model)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = add_adapter(model, cfg.method, cfg.lora, cfg.model.gradient_checkpointing)
    optimizer, loss_fn = build_optimizer(model, cfg.optim), build_step_loss(model, cfg.trainer)

    def step(batch):
        with torch.autocast(device.type, dtype=torch.bfloat16):  # as accelerate wraps the model's forward
            parts = loss_fn(model, batch)
        learned = (batch["labels"][:, 1:] != -100).sum()
        (parts["loss"] / learned).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed_steps(step, model.config.vocab_size, cfg, device, steps, seed)


def trl_steps(cfg, device: torch.device, steps: int, seed: int = 0) -> dict | None:
    """The same steps with TRL's SFTTrainer (gradient checkpointing as the recipe); None without TRL."""
    try:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import TrainerCallback
        from trl import SFTConfig, SFTTrainer
    except ImportError:
        return None
    model = random_model(cfg, device, quantize=cfg.quant.bits == 4)
    ids = random_batches(model.config.vocab_size, cfg, steps + 1, seed)
    rows = Dataset.from_dict({"input_ids": [row.tolist() for batch in ids for row in batch["input_ids"]]})
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            times.append(time.perf_counter())
            if len(times) == 1:
                reset_peak(device)

    args = SFTConfig(output_dir=str(Path("/tmp") / "ftune-gpu-check-trl"), max_steps=steps + 1,
                     per_device_train_batch_size=cfg.trainer.micro_batch_size, learning_rate=cfg.optim.lr,
                     gradient_checkpointing=cfg.model.gradient_checkpointing, max_length=cfg.data.max_length,
                     bf16=True, use_cpu=device.type == "cpu", report_to="none", save_strategy="no",
                     logging_steps=1, packing=False, dataset_num_proc=None)
    peft = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=rows, peft_config=peft, callbacks=[Clock()])
    trainer.train()
    tokens = cfg.trainer.micro_batch_size * cfg.data.max_length * steps
    return {"tokens_per_s": tokens / (times[-1] - times[0]), "peak_gb": peak_gb(device)}


def random_batches(vocab: int, cfg, count: int, seed: int) -> list[dict]:
    """Full rows of random tokens, every token learned (TRL's default), identical for both tools."""
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.trainer.micro_batch_size, cfg.data.max_length)
    batches = []
    for _ in range(count):
        ids = torch.randint(0, vocab, shape, generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def timed_steps(step, vocab: int, cfg, device: torch.device, steps: int, seed: int) -> dict:
    """One warm-up step, then `steps` timed ones: tokens/s and the peak allocated memory of the timed ones."""
    batches = [{k: v.to(device) for k, v in b.items()} for b in random_batches(vocab, cfg, steps + 1, seed)]
    step(batches[0])
    synchronize(device)
    reset_peak(device)
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": cfg.trainer.micro_batch_size * cfg.data.max_length * steps / seconds,
            "peak_gb": peak_gb(device)}


def packing_check(device: torch.device, smoke_dir: Path | None) -> dict:
    """Per-token loss of random documents packed into rows against the same documents padded."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from ftune.data.collate import PackedCollator, PadCollator
    from ftune.data.packing import pack
    from ftune.train.losses import UNFUSED

    config = LlamaConfig(**SMOKE_SHAPE) if smoke_dir else LlamaConfig(**SMOKE_SHAPE | {"hidden_size": 256})
    attn = attention(device)
    config._attn_implementation = attn
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if attn != "sdpa" else torch.float32)
    gen = torch.Generator().manual_seed(0)
    documents = []
    for length in (37, 90, 12, 64, 55, 101, 8, 73):
        ids = torch.randint(1, config.vocab_size, (length,), generator=gen).tolist()
        documents.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3:]})
    losses = {}
    for name, collate, rows in (("packed", PackedCollator(0, attn, pad_to_multiple_of=8), pack(documents, 128)),
                                ("unpacked", PadCollator(0, 8), documents)):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(rows).items()}
        with torch.no_grad():
            loss_sum = UNFUSED(model.eval(), batch)["loss"]
        losses[name] = (loss_sum / (batch["labels"][:, 1:] != -100).sum()).item()
    return {"attention": attn, **losses, "relative_gap": abs(losses["packed"] / losses["unpacked"] - 1)}


def check(model_name: str, method: str, args, device: torch.device, smoke_dir: Path | None) -> dict:
    """One (model, method): ftune's and TRL's steps and the plan's estimate."""
    from ftune.plan.estimate import GIB, plan_run
    from ftune.train.losses import build_step_loss

    cfg = run_config(model_name, method, args.seq_len, args.micro_batch, smoke_dir)
    plan = plan_run(cfg, device=device.type, step_loss=build_step_loss).memory
    row = {"model": model_name, "method": method, "tokens_per_step": args.seq_len * args.micro_batch,
           "plan_gb": plan.total / GIB, "ftune": ftune_steps(cfg, device, args.steps)}
    release(device)
    row["trl"] = None if args.skip_trl else trl_steps(cfg, device, args.steps)
    release(device)
    if row["trl"]:
        row["speed_ratio_vs_trl"] = row["ftune"]["tokens_per_s"] / row["trl"]["tokens_per_s"]
    return row


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak allocated accelerator memory since the last reset, GiB; None on CPU (no allocator to read)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def release(device: torch.device) -> None:
    """Free what the last check left, so the next one's peak is its own."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def smoke_model(out: Path) -> Path:
    """A tiny random Llama with the embedded model's tokenizer, saved for the config to point at."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = out / "smoke_model"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMOKE_SHAPE)).save_pretrained(path)
    AutoTokenizer.from_pretrained(REPO / "ftune" / "assets" / "models" / "tiny").save_pretrained(path)
    return path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "gpu")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny random model on CPU, LoRA only: CI's check")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--skip-trl", action="store_true")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(REPO))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.cpu_smoke:
        device, smoke_dir = torch.device("cpu"), smoke_model(args.out)
        args.steps, args.seq_len, args.micro_batch = min(args.steps, 2), min(args.seq_len, 64), 2
        pairs = [("smoke", "lora")]
    elif torch.cuda.is_available():
        device, smoke_dir = torch.device("cuda"), None
        pairs = [(model, method) for model in SHAPES for method in RECIPES]
    else:
        sys.exit("gpu_check: no CUDA device; use --cpu-smoke for the CPU check")
    rows = [check(model, method, args, device, smoke_dir) for model, method in pairs]
    summary = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "rows": rows, "packing": packing_check(device, smoke_dir)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for row in rows:
        print(json.dumps(row))
    print(json.dumps(summary["packing"]))


if __name__ == "__main__":
    main()
