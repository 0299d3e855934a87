"""Measure ftune's data preparation against TRL 1.16's on the same generated chat data, in the same run.

    pip install -e ".[bench]"                                              # TRL, a benchmark dependency only
    python scripts/data_bench.py --json results/data_bench.json            # 100k: ftune num_proc 1 and 2, TRL
    python scripts/data_bench.py --sizes 100000 1000000 --json results/data_bench.json
    python scripts/data_bench.py --sizes 2000                              # a smoke test (figures mean little)

The data: N conversations generated from the sentences of the shipped chat data, seeded (`generate`): 1 to 6
user/assistant turn pairs (mostly 1-2) of one sentence each, a system turn in 70%, and 3% long ones (user
turns of 12 sentences), so that some are truncated at 512 tokens; ~100 tokens a conversation on average, as
the shipped data has. Each configuration runs as its own process on a cold cache (a fresh
FTUNE_CACHE and HF_DATASETS_CACHE) and is timed from start to exit, imports included:

- `ftune_np1`, `ftune_np2`: `python -m ftune data recipe=tiny_lora data.path=FILE data.eval_path=null
  data.num_proc=N n=0 --json`: the training split exactly as `ftune train` builds it (chat template, labels of
  every assistant turn with the span check and the sampled decode check, duplicate report, truncation, rows
  in the Arrow cache), then its statistics.
- `ftune_stream`: one pass of `data.streaming=true` as training reads it (`TrainingStream.pass_rows`: read,
  labelled, shuffled in the 10,000-example buffer; one process, no cache, no duplicate report), no model.
- `trl`: TRL's `SFTTrainer` built on the same file (`load_dataset("json")`) with the embedded model, the
  tokenizer's chat template and `max_length=512`, its defaults otherwise (one process; it tokenizes the
  conversations and truncates; with that template it learns every token, so it computes no labels).

Figures per run: wall seconds, conversations per second (N / wall); the preparation alone (`prepare_s`:
`build_train_split` in ftune, `load_dataset` plus `SFTTrainer(...)` in TRL, the model already loaded) and
its conversations per second; and peak memory: `peak_rss_mb` is the largest resident set of the main process
(ru_maxrss), `peak_tree_pss_mb` the largest proportional set size summed over the process and its workers
(shared pages counted once), sampled every 0.5 s. Resident sets count the pages of memory-mapped files a
process has touched; those are the page cache's, dropped by the kernel under pressure. The machine's load
average is recorded beside them: on a shared machine, compare configurations within one run.
"""

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import psutil

from ftune.atomic import write_text

REPO = Path(__file__).resolve().parents[1]
CHAT_TRAIN = REPO / "ftune" / "assets" / "data" / "chat" / "train.jsonl"
TINY_MODEL = REPO / "ftune" / "assets" / "models" / "tiny"
MAX_LENGTH = 512
SEED = 0
TURN_PAIRS = (1, 1, 1, 1, 1, 1, 2, 2, 2, 3, 4, 6)
"""Drawn uniformly: how many user/assistant pairs a conversation has."""
LONG_SHARE, LONG_FACTOR = 0.03, 12
SYSTEM_SHARE = 0.7
SAMPLE_EVERY_S = 0.5
"""Seconds between samples of the process tree's proportional set size: reading every process's smaps costs CPU
the measured processes need (15% of a core at 0.1 s with three processes); the peak RSS is exact regardless."""

TRL_PREPARE = """
import json, sys, time
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer
data, model, out, max_length = sys.argv[1:]
args = SFTConfig(output_dir=out, max_length=int(max_length), report_to="none", use_cpu=True, bf16=False)
model, tokenizer = AutoModelForCausalLM.from_pretrained(model), AutoTokenizer.from_pretrained(model)
started = time.perf_counter()
trainer = SFTTrainer(model=model, args=args, processing_class=tokenizer,
                     train_dataset=load_dataset("json", data_files=data, split="train"))
print(json.dumps({"seconds": time.perf_counter() - started, "rows": len(trainer.train_dataset)}))
"""

FTUNE_STREAM = """
import json, sys, time
from ftune.config.compose import load_run_config
from ftune.data.stream import open_stream
from ftune.model.load import load_tokenizer
cfg, _ = load_run_config(["recipe=tiny_lora", f"data.path={sys.argv[1]}", "data.eval_path=null",
                          "data.streaming=true", "trainer.max_steps=1"])
started = time.perf_counter()
stream = open_stream(load_tokenizer(cfg.model), cfg.data, cfg.seed, cfg.trainer.micro_batch_size)
rows = sum(1 for _ in stream.pass_rows(0))
print(json.dumps({"seconds": time.perf_counter() - started, "rows": rows}))
"""


def generate(count: int, path: Path) -> None:
    """Write `count` conversations as JSONL (see the module docstring), seeded, so every run sees the same."""
    rng = random.Random(SEED)
    records = [json.loads(line) for line in CHAT_TRAIN.read_text().splitlines()]
    sentences = [m["content"] for r in records for m in r["messages"] if m["role"] != "system"]
    systems = sorted({m["content"] for r in records for m in r["messages"] if m["role"] == "system"})
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(count):
            long = rng.random() < LONG_SHARE
            messages = [{"role": "system", "content": rng.choice(systems)}] if rng.random() < SYSTEM_SHARE else []
            for _ in range(rng.choice(TURN_PAIRS)):
                asked = LONG_FACTOR if long else 1
                messages.append({"role": "user", "content": " ".join(rng.choices(sentences, k=asked))})
                messages.append({"role": "assistant", "content": rng.choice(sentences)})
            handle.write(json.dumps({"messages": messages}) + "\n")


def commands(data: Path, work: Path) -> dict[str, list[str]]:
    """Configuration name -> the command that prepares `data` that way."""
    ftune = [sys.executable, "-m", "ftune", "data", "recipe=tiny_lora", f"data.path={data}", "data.eval_path=null",
             "n=0"]
    return {
        "ftune_np1": [*ftune, "data.num_proc=1", "--json"],
        "ftune_np2": [*ftune, "data.num_proc=2", "--json"],
        "ftune_stream": [sys.executable, "-c", FTUNE_STREAM, str(data)],
        "trl": [sys.executable, "-c", TRL_PREPARE, str(data), str(TINY_MODEL), str(work / "trl_out"), str(MAX_LENGTH)],
    }


def measure(command: list[str], work: Path) -> dict:
    """Run one configuration on a cold cache: wall seconds, peak RSS of the process and of its tree, its output."""
    env = {**os.environ, "FTUNE_CACHE": str(work / "ftune_cache"), "HF_DATASETS_CACHE": str(work / "hf_cache"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    out, err = work / "stdout.txt", work / "stderr.txt"
    started = time.perf_counter()
    with out.open("w") as stdout, err.open("w") as stderr:
        process = psutil.Popen(command, env=env, stdout=stdout, stderr=stderr, cwd=REPO)
        tree_peak, status, usage = 0, None, None
        while status is None:
            tree_peak = max(tree_peak, tree_pss(process))
            time.sleep(SAMPLE_EVERY_S)
            pid, code, rusage = os.wait4(process.pid, os.WNOHANG)  # this child's own figures, once it exits
            status, usage = (os.waitstatus_to_exitcode(code), rusage) if pid else (None, None)
    wall = time.perf_counter() - started
    if status != 0:
        raise SystemExit(f"{' '.join(command[:4])} failed ({status}):\n{err.read_text()[-3000:]}")
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "peak_tree_pss_mb": round(tree_peak / 2**20), "report": json.loads(out.read_text().splitlines()[-1])}


def tree_pss(process: psutil.Process) -> int:
    """Proportional resident bytes of a process and all its descendants (data workers), 0 once it is gone.

    PSS, not RSS: forked workers share their parent's pages, which RSS would count once per process.
    """
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for member in members:
        try:
            total += member.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="conversations per data set")
    parser.add_argument("--configs", nargs="+", default=["ftune_np1", "ftune_np2", "ftune_stream", "trl"])
    parser.add_argument("--large-configs", nargs="+", default=["ftune_np2"],
                        help="configurations run on sizes above 100,000 (the others take hours there)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    results = {"machine": machine, "command": " ".join(["python", "scripts/data_bench.py", *sys.argv[1:]]), "runs": []}
    with tempfile.TemporaryDirectory(prefix="ftune-data-bench-") as tmp:
        for size in args.sizes:
            data = Path(tmp) / f"chat_{size}.jsonl"
            generate(size, data)
            names = args.configs if size <= 100_000 else args.large_configs
            for name in names:
                work = Path(tmp) / f"{name}_{size}"
                work.mkdir()
                load_before = os.getloadavg()[0]
                run = measure(commands(data, work)[name], work)
                prepare_s = run["report"]["seconds"]
                run |= {"config": name, "conversations": size, "conversations_per_s": round(size / run["wall_s"]),
                        "prepare_s": round(prepare_s, 1), "prepare_conversations_per_s": round(size / prepare_s),
                        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
                print(json.dumps({k: v for k, v in run.items() if k != "report"}), flush=True)
                results["runs"].append(run)
                if args.json:  # after every run: a long one that is stopped keeps what it measured
                    write_text(args.json, json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
