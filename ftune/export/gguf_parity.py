"""Read a GGUF back with llama.cpp (through llama-cpp-python) and compare it with the trained model.

Four checks, each in the parity report:
- tokenization: llama.cpp encodes every probe text (special tokens included) to the ids transformers does;
- next-token log-probabilities over the probe, all positions and the whole vocabulary: the largest gap and the
  mean KL divergence, each within the `quant`'s tolerance (`LOGPROB_TOLERANCE`, `KL_TOLERANCE`);
- greedy generations for a few prompts: identical, except that a divergence at a near tie (the trained
  model's two candidates closer in log-probability than the tolerance) is excused and reported as such;
- the chat template in the file's metadata, rendered by llama-cpp-python's own formatter for a two-turn
  conversation, equals what the trained model's tokenizer renders.
"""

from contextlib import closing
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from ftune.export.gguf_file import generation_stop_ids
from ftune.export.parity import PROBE_CONVERSATION, identical, within

LOGPROB_TOLERANCE = {"f16": 0.05, "bf16": 0.3, "q8_0": 1.0}
"""Largest |log p(gguf) - log p(transformers)| accepted over the probe (nats, every position and token)."""
KL_TOLERANCE = {"f16": 1e-5, "bf16": 2e-4, "q8_0": 3e-3}
"""Largest mean KL(transformers || gguf) of the next-token distributions over the probe (nats).

Both measured on the embedded model after a 10-step tiny_lora run (118 probe positions; docs/export.md):
f16 0.013 and 3e-7, bf16 0.095 and 2e-5, q8_0 0.42 and 3e-4 (99.2% of positions keep their top token). Each
tolerance is 2-4x the largest log-prob gap and ~10x the mean KL: f16 rounds weights to 11 significant bits, bf16
to 8, q8_0 to 8-bit integers per block of 32 with an f16 scale, and a 256-wide model averages that error over
few terms. A conversion that gets the tensor layout wrong misses by whole nats.
"""
GENERATION_PROMPTS = ("Tell me a short story.", "What is the capital of France?", "Say walked in the present.")
MAX_NEW_TOKENS = 16
CONTEXT = 1024
"""llama.cpp context of the check: the probe and every prompt with its generation fit in it."""
SINGLE_THREAD_BYTES = 256 * 2**20
"""Files below this size are run on one thread: llama.cpp's threads meet at spin barriers after every op, which
for a small model costs more than the op itself, and far more on shared cores (the embedded model's 3 greedy
generations took 3.0 s on 2 threads and 0.22 s on 1, on 2 busy cores)."""


def load_llama(path):
    """The GGUF at `path` in llama-cpp-python, keeping the logits of every position (`logits_all`)."""
    from llama_cpp import Llama

    threads = 1 if Path(path).stat().st_size < SINGLE_THREAD_BYTES else torch.get_num_threads()
    return Llama(model_path=str(path), n_ctx=CONTEXT, logits_all=True, n_threads=threads, n_threads_batch=threads,
                 verbose=False, seed=0)


def gguf_parity(path, saved, quant: str) -> dict:
    """Compare the GGUF at `path` with the trained model.

    Args:
        path: the GGUF file.
        saved: the full-precision standalone model it was converted from (`hf.Standalone`: its directory is
            `saved.directory`), with the trained model's tokenizer, probe and fp32 logits on the probe.
        quant: the file's encoding (a key of `LOGPROB_TOLERANCE`).

    Returns:
        The parity report (`ftune.export.parity`).
    """
    import llama_cpp

    model = AutoModelForCausalLM.from_pretrained(saved.directory, dtype=torch.float32).eval()
    with closing(load_llama(path)) as llm:  # freed here, not by llama-cpp-python's __del__ at interpreter exit
        checks = {"tokenization of the probe": identical(
            [llm.tokenize(text.encode(), add_bos=False, special=True) for text in saved.texts],
            [ids[0].tolist() for ids in saved.batch])}
        checks |= distribution_checks(gguf_logits(llm, saved.batch), saved.reference, quant)
        checks["greedy generations"] = compare_generations(llm, model, saved.tokenizer, LOGPROB_TOLERANCE[quant])
        checks["chat template via llama-cpp-python, two-turn conversation"] = template_check(llm, saved.tokenizer)
    return {"runtime": f"llama-cpp-python {llama_cpp.__version__}", "quant": quant, "checks": checks}


def distribution_checks(served_logits: torch.Tensor, trained_logits: torch.Tensor, quant: str) -> dict:
    """The next-token distributions of the file against the trained model's: largest log-prob gap, mean KL."""
    served, trained = served_logits.log_softmax(-1), trained_logits.log_softmax(-1)
    kl = (trained.exp() * (trained - served)).sum(-1)
    return {
        "next-token log-probs, max |diff| (nats)": within((served - trained).abs().max().item(),
                                                          LOGPROB_TOLERANCE[quant]),
        "next-token KL divergence, mean (nats)": within(kl.mean().item(), KL_TOLERANCE[quant],
                                                        top_token_agreement=top_token_agreement(served, trained)),
    }


def top_token_agreement(served: torch.Tensor, trained: torch.Tensor) -> float:
    """Share of probe positions where both models put the same token first."""
    return (served.argmax(-1) == trained.argmax(-1)).float().mean().item()


def gguf_logits(llm, batch: list[torch.Tensor]) -> torch.Tensor:
    """llama.cpp's logits at every position of every probe sequence, concatenated like `probe_logits`."""
    rows = []
    for ids in batch:
        llm.reset()
        llm.eval(ids[0].tolist())
        rows.append(torch.from_numpy(llm.scores[: llm.n_tokens].copy()))
    return torch.cat(rows).float()


def generation_prompts(tokenizer) -> list[list[int]]:
    """`GENERATION_PROMPTS` as the chat template asks for an answer (plain text when there is no template)."""
    if tokenizer.chat_template is None:
        return [tokenizer.encode(prompt) for prompt in GENERATION_PROMPTS]
    return [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for prompt in GENERATION_PROMPTS]


def compare_generations(llm, model, tokenizer, tolerance: float) -> dict:
    """Greedy continuations of each prompt in llama.cpp and transformers, stopping at the same stop ids.

    A divergence passes only at a near tie: where the trained model prefers its token over llama.cpp's by no
    more than `tolerance` nats, which the quantization error allows to flip.
    """
    stop_ids = set(generation_stop_ids(model.generation_config))
    results = []
    for prompt in generation_prompts(tokenizer):
        expected = transformers_greedy(model, prompt, stop_ids)
        actual = llama_greedy(llm, prompt, stop_ids)
        results.append(divergence(model, prompt, expected, actual))
    diverged = [result for result in results if result["first_difference"] is not None]
    passed = all(result["margin"] <= tolerance for result in diverged)
    value = "identical" if not diverged else f"{len(diverged)} of {len(results)} diverged at a near tie"
    return {"value": value if passed else "different", "tolerance": None, "passed": passed, "prompts": results}


@torch.no_grad()
def transformers_greedy(model, prompt: list[int], stop_ids: set[int]) -> list[int]:
    """The trained model's greedy continuation of `prompt`, up to and including a stop id."""
    output = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS,
                            eos_token_id=sorted(stop_ids) or None)
    return cut_at_stop(output[0, len(prompt):].tolist(), stop_ids)


def llama_greedy(llm, prompt: list[int], stop_ids: set[int]) -> list[int]:
    """llama.cpp's greedy continuation (its own sampler at temperature 0, no repetition penalty)."""
    tokens = []
    for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        tokens.append(token)
        if token in stop_ids or len(tokens) == MAX_NEW_TOKENS:
            break
    return tokens


def cut_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """`tokens` up to and including the first stop id."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1]
    return tokens


@torch.no_grad()
def divergence(model, prompt: list[int], expected: list[int], actual: list[int]) -> dict:
    """Where two continuations first differ, and by how much the trained model preferred its own token there."""
    first = next((i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b), None)
    if first is None and len(expected) != len(actual):
        first = min(len(expected), len(actual))
    result = {"transformers": expected, "llama.cpp": actual, "first_difference": first, "margin": 0.0}
    if first is not None and first < min(len(expected), len(actual)):
        logprobs = model(torch.tensor([prompt + expected[:first]])).logits[0, -1].float().log_softmax(-1)
        result["margin"] = (logprobs[expected[first]] - logprobs[actual[first]]).item()
    elif first is not None:
        result["margin"] = float("inf")  # one side stopped, the other went on: not a tie of two tokens
    return result


def template_check(llm, tokenizer) -> dict:
    """The file's chat template through llama-cpp-python's formatter vs the trained tokenizer's rendering.

    The formatter is built as `Llama` builds its chat handler (from `tokenizer.chat_template` in the metadata,
    asking for the next assistant turn), and given the conversation up to the last user turn, which is what a
    server renders before generating the second answer.
    """
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if template is None or tokenizer.chat_template is None:
        return identical(template, tokenizer.chat_template)
    messages = PROBE_CONVERSATION[:-1]
    formatter = Jinja2ChatFormatter(template=template, eos_token=token_text(llm, llm.token_eos()),
                                    bos_token=token_text(llm, llm.token_bos()))
    served = formatter(messages=messages).prompt
    return identical(served, tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def token_text(llm, token_id: int) -> str:
    """A token's text as llama.cpp stores it (what its chat handler passes as `eos_token`/`bos_token`)."""
    return llm.detokenize([token_id], special=True).decode("utf-8", errors="replace")
