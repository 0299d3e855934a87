"""Build ftune's embedded default model offline: tokenizer, corpus, Llama model, CPU pretraining, report.

Nothing can be downloaded where ftune is tested, so the default model is made here from the tinyworld text:
    python scripts/build_tiny_model.py                   # tiny (default model) -> ftune/assets/models/tiny
    python scripts/build_tiny_model.py --preset micro    # distillation student -> ftune/assets/models/micro
    python scripts/build_tiny_model.py --preset small --tokens 8192 --out /tmp/small  # check the bench preset
Every preset shares one tokenizer (distillation needs one vocabulary): it is read from --tokenizer when that
directory has one, and trained and saved with the model otherwise. Runs are deterministic for fixed seeds.
On a machine shared with other jobs, set OMP_WAIT_POLICY=PASSIVE: OpenMP threads that spin while they wait
slow everything down (measured on 2 busy cores: 160 tokens/s spinning, 550 passive).
"""

import argparse
import itertools
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import tinyworld as world
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ftune.model.dtypes import cpu_has_bf16

REPO = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO / "ftune" / "assets" / "models"
EOT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
# Qwen2's ChatML template without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
VOCAB_SIZE = 4096  # an upper bound: BPE stops earlier once every word of the closed world is one token
SEQ_LEN = 256
CHAT_EVERY = 10  # one text in ten is a dialogue, so the ChatML tokens get trained embeddings
TOKENIZER_TEXTS = 20_000
CORPUS_SEED, EVAL_SEED = 1, 2  # the datasets script uses other seeds, so its texts are held out too
EVAL_TEXTS = 400
WEIGHT_DECAY, BETAS, GRAD_CLIP, WARMUP_FRACTION = 0.1, (0.9, 0.95), 1.0, 0.05  # usual small-LM pretraining
LOG_EVERY = 25
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "Answer questions about the text.",
    "Answer in one sentence.",
)
STORY_REQUESTS = ("Tell me a short story.", "Write a few sentences about someone.", "Tell me what happened.")
SAMPLE_PROMPTS = ("Tom walked to the", "Every morning, Anna")


@dataclass(frozen=True)
class Preset:
    """A Llama shape and the pretraining budget that fits it into ~20 minutes on 2 CPU cores."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    tokens: int  # pretraining tokens; the corpus is generated fresh, so no token is seen twice
    lr: float  # peak learning rate of the cosine schedule
    batch_size: int = 8  # sequences of SEQ_LEN tokens per step; at 600k tokens 8 beat 16 (ppl 11.1 vs 15.1)


PRESETS = {
    "tiny": Preset(256, 6, 4, 2, 688, tokens=3_000_000, lr=2e-3),
    "micro": Preset(128, 2, 4, 2, 512, tokens=2_000_000, lr=3e-3),
    "small": Preset(768, 10, 12, 4, 2048, tokens=2_000_000, lr=6e-4),
    "base": Preset(768, 16, 12, 4, 2048, tokens=2_000_000, lr=6e-4),  # ~100M: the bench's speed target
}


def parse_args() -> argparse.Namespace:
    """Read the command line; defaults come from the preset."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--out", type=Path, help="output directory (default: ftune/assets/models/PRESET)")
    parser.add_argument("--tokens", type=int, help="pretraining tokens (default: the preset's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="sequences per step (default: the preset's)")
    parser.add_argument("--tokenizer", type=Path, default=MODELS_DIR / "tiny", help="directory to reuse it from")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights init")
    return parser.parse_args()


def make_dialogue(rng: random.Random) -> list[dict[str, str]]:
    """A generic chat about the world: a story on request, or questions about a few sentences."""
    messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < 0.3 else []
    if rng.random() < 0.3:
        story = world.make_document(rng)
        return [
            *messages,
            {"role": "user", "content": rng.choice(STORY_REQUESTS)},
            {"role": "assistant", "content": story},
        ]
    tense = rng.choice(world.TENSES)
    clauses = [world.make_clause(rng) for _ in range(rng.randint(1, 3))]
    answers = [world.render(world.Sentence((clause,)), tense) for clause in clauses]
    for turn, i in enumerate(rng.sample(range(len(clauses)), rng.randint(1, len(clauses)))):
        question = world.ask(clauses[i], tense, rng.choice(("subject", "complement")))
        user = f"{' '.join(answers)}\n{question}" if turn == 0 else question
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answers[i]}]
    return messages


def world_texts(rng: random.Random, render_chat: Callable[[list[dict[str, str]]], str]) -> Iterator[str]:
    """Endless pretraining texts: tinyworld documents, every CHAT_EVERY-th one a dialogue."""
    for i in itertools.count():
        yield render_chat(make_dialogue(rng)) if i % CHAT_EVERY == 0 else world.make_document(rng)


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (as GPT-2/Qwen2 use) with ChatML specials, no BOS and `<|im_end|>` as EOS."""
    bpe = tokenizers.Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)  # exact offsets for masking by spans
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOT, IM_START, IM_END, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    def plain_chat(messages: list[dict[str, str]]) -> str:
        # The special tokens are added whole, so the merges are learnt from roles and contents only.
        return "\n".join(f"{m['role']}\n{m['content']}" for m in messages)

    texts = world_texts(random.Random(CORPUS_SEED), plain_chat)
    bpe.train_from_iterator((next(texts) for _ in range(TOKENIZER_TEXTS)), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=IM_END,
        pad_token=PAD,
        extra_special_tokens=[EOT, IM_START],
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
    )


def load_or_train_tokenizer(source: Path) -> PreTrainedTokenizerFast:
    """Reuse the shared tokenizer when `source` has one, so that every preset has the same vocabulary."""
    if (source / "tokenizer.json").exists():
        print(f"tokenizer: reusing {source}", flush=True)
        return transformers.AutoTokenizer.from_pretrained(source)
    print("tokenizer: training", flush=True)
    return train_tokenizer()


def build_corpus(tok: PreTrainedTokenizerFast, n_tokens: int) -> torch.Tensor:
    """Tokenize fresh world texts, each followed by `<|endoftext|>`, packed into rows of SEQ_LEN tokens."""
    texts = world_texts(random.Random(CORPUS_SEED), lambda m: tok.apply_chat_template(m, tokenize=False))
    eot = tok.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    while len(ids) < n_tokens:
        for row in tok([next(texts) for _ in range(1000)], add_special_tokens=False)["input_ids"]:
            ids += [*row, eot]
    rows = max(1, n_tokens // SEQ_LEN)
    return torch.tensor(ids[: rows * SEQ_LEN]).view(rows, SEQ_LEN)


def build_model(preset: Preset, tok: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama with ChatML stop tokens and no BOS, plus its generation config."""
    torch.manual_seed(seed)
    im_end, eot, pad = tok.convert_tokens_to_ids([IM_END, EOT, PAD])
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=preset.hidden_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        intermediate_size=preset.intermediate_size,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=pad,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[im_end, eot], pad_token_id=pad)
    return model


def pretrain(model: LlamaForCausalLM, data: torch.Tensor, preset: Preset) -> dict[str, float]:
    """AdamW with warmup and cosine decay over one pass of `data`; fp32 master weights.

    bf16 autocast where the CPU has bf16 instructions; elsewhere torch emulates bf16 at 1-2% of fp32's rate (a
    4-step `base` build then took over 20 minutes), so those machines train in fp32.
    """
    steps = max(1, len(data) // preset.batch_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norms
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=preset.lr, betas=BETAS)
    warmup = max(1, int(steps * WARMUP_FRACTION))
    schedule = transformers.get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    autocast = cpu_has_bf16()
    model.train()
    start = time.time()
    for step in range(steps):
        batch = data[step * preset.batch_size : (step + 1) * preset.batch_size]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % LOG_EVERY == 0 or step == steps - 1:
            seconds = time.time() - start
            rate = (step + 1) * batch.numel() / seconds
            print(f"step {step + 1}/{steps} loss {loss.item():.3f} {rate:.0f} tok/s {seconds:.0f}s", flush=True)
    seconds = round(time.time() - start, 1)
    return {"steps": steps, "tokens_trained": steps * preset.batch_size * SEQ_LEN, "train_seconds": seconds}


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast, texts: list[str]) -> float:
    """Token-level perplexity of each text on its own, in fp32 (padding masked out of the mean)."""
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for i in range(0, len(texts), 32):
        batch = tok(texts[i : i + 32], padding=True, return_tensors="pt")
        logits = model(**batch).logits[:, :-1].float()
        targets, mask = batch["input_ids"][:, 1:], batch["attention_mask"][:, 1:]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        total_nll += (nll * mask).sum().item()
        total_tokens += mask.sum().item()
    return math.exp(total_nll / total_tokens)


def evaluate(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> dict[str, float]:
    """Held-out perplexities on texts drawn with EVAL_SEED, also split by regular and irregular verbs."""
    return {
        "documents": perplexity(model, tok, world.generate_documents(EVAL_TEXTS, EVAL_SEED)),
        "regular_sentences": perplexity(model, tok, world.generate_sentences(EVAL_TEXTS, EVAL_SEED, "regular")),
        "irregular_sentences": perplexity(model, tok, world.generate_sentences(EVAL_TEXTS, EVAL_SEED, "irregular")),
    }


@torch.no_grad()
def sample(model: LlamaForCausalLM, tok: PreTrainedTokenizerFast) -> list[str]:
    """Greedy continuations of a few prompts, plain and chat, to eyeball in the report."""
    chat = tok.apply_chat_template(
        [{"role": "user", "content": STORY_REQUESTS[0]}], tokenize=False, add_generation_prompt=True
    )
    outputs = []
    for prompt in (*SAMPLE_PROMPTS, chat):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        new = model.generate(ids, max_new_tokens=48, do_sample=False)[0, ids.shape[1] :]
        outputs.append(prompt + tok.decode(new))
    return outputs


def main() -> None:
    """Build one preset: tokenizer, corpus, model, pretraining, evaluation, then save everything."""
    args = parse_args()
    start = time.time()
    torch.set_num_threads(2)  # the target machine's cores; more threads than cores only adds contention
    overrides = {"tokens": args.tokens, "lr": args.lr, "batch_size": args.batch_size}
    preset = replace(PRESETS[args.preset], **{k: v for k, v in overrides.items() if v is not None})
    out = args.out or MODELS_DIR / args.preset
    tok = load_or_train_tokenizer(args.tokenizer)
    data = build_corpus(tok, preset.tokens)
    model = build_model(preset, tok, args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.preset}: {params / 1e6:.2f}M params, vocab {len(tok)}, {data.numel()} corpus tokens",
        flush=True,
    )
    training = pretrain(model, data, preset)
    held_out = evaluate(model, tok)
    print("held-out perplexity:", json.dumps(held_out), flush=True)
    samples = sample(model, tok)
    print("\n".join(samples), flush=True)
    model.to(torch.bfloat16).save_pretrained(out)  # bf16 halves the committed file
    tok.save_pretrained(out)
    report = {
        "preset": args.preset,
        "settings": asdict(preset),
        "params": params,
        "vocab_size": len(tok),
        **training,
        "wall_seconds": round(time.time() - start, 1),
        "held_out_perplexity": held_out,
        "seeds": {"init": args.seed, "corpus": CORPUS_SEED, "eval": EVAL_SEED},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "samples": samples,
    }
    (out / "build_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out} in {report['wall_seconds']}s", flush=True)


if __name__ == "__main__":
    main()
