"""Turn tokenized examples, or packed rows of them, into batches of tensors."""

from dataclasses import dataclass

import torch

from ftune.config.schema import DataCfg
from ftune.data.mask import IGNORE_INDEX
from ftune.data.packing import attention_mask, block_causal_mask
from ftune.device import local_device

GPU_PAD_MULTIPLE = 8
"""What `data.pad_to_multiple_of=0` rounds padded lengths up to on a GPU."""


@dataclass
class PadCollator:
    """Right-pad a list of examples to the longest one (rounded up to `pad_to_multiple_of`).

    Example, with pad_token_id=0 and pad_to_multiple_of=4:
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
        -> input_ids      [[5, 6, 7, 0], [8, 0, 0, 0]]
           labels         [[-100, 6, 7, -100], [8, -100, -100, -100]]
           attention_mask [[1, 1, 1, 0], [1, 0, 0, 0]]
           num_tokens     4 (real tokens, for throughput)
    """

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        width = padded_width(longest, self.pad_to_multiple_of)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.tensor(example["input_ids"])
            labels[row, :n] = torch.tensor(example["labels"])
            attention_mask[row, :n] = 1
        return {
            "input_ids": input_ids,
            "labels": labels,
            "attention_mask": attention_mask,
            "num_tokens": attention_mask.sum(),
        }


@dataclass
class PackedCollator:
    """Batch packed rows (see `ftune.data.packing`) with the attention inputs that isolate their documents.

    `sdpa` gets a bool block-diagonal 4D mask, `eager` an additive one in `mask_dtype`, and
    `flash_attention_2` no mask but the restarting `position_ids`, from which it finds the documents.
    """

    pad_token_id: int
    attn_implementation: str
    mask_dtype: torch.dtype = torch.float32
    pad_to_multiple_of: int = 1

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = PadCollator(self.pad_token_id, self.pad_to_multiple_of)(rows)
        width = batch["input_ids"].size(1)
        batch["position_ids"] = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            batch["position_ids"][index, : len(row["position_ids"])] = torch.tensor(row["position_ids"])
        if self.attn_implementation == "flash_attention_2":
            del batch["attention_mask"]
        else:
            dtype = None if self.attn_implementation == "sdpa" else self.mask_dtype
            batch["attention_mask"] = block_causal_mask([row["seq_lens"] for row in rows], width, dtype)
        return batch


@dataclass
class PairCollator:
    """Batch preference pairs for one forward: each response after its prompt, in two rows or in one.

    Rows hold `prompt_ids`, `chosen_ids`, `rejected_ids` (`ftune.data.preference`). Rows that carry their index
    (`row`, from `PairRows`) give the batch `row` [B] too.

    Two layouts, chosen by `shared_mask` (the preference objective sets it once the model has passed its probe):

    - None: rows 0..B-1 are prompt + chosen and rows B..2B-1 prompt + rejected, right-padded; only response tokens
      are labelled. Example, pad_token_id=0, one pair: prompt [5, 6], chosen [7, 8], rejected [9]
        -> input_ids      [[5, 6, 7, 8], [5, 6, 9, 0]]
           labels         [[-100, -100, 7, 8], [-100, -100, 9, -100]]
           attention_mask [[1, 1, 1, 1], [1, 1, 1, 0]]
           num_tokens 7 (real tokens), num_pairs 1
    - an attention implementation (`sdpa`, `eager`): one row per pair, prompt + chosen + rejected, whose 4D mask
      lets each response see the prompt and itself only and whose positions restart after the prompt for each
      response, so every response token gets the hidden state it would get in its own row. The prompt's tokens are
      computed once instead of twice. `logp_source`, `logp_target`, `logp_slot`, `logp_offset` list every response
      token: the flat index (row * width + position) of the hidden state that predicts it (for the rejected
      response's first token, the prompt's last position), the token, its sequence (pair b's chosen b, its rejected
      B + b) and its place in its response (`shared_prompt_rows`, which GRPO's groups use too).
      The same pair -> input_ids [[5, 6, 7, 8, 9]], position_ids [[0, 1, 2, 3, 2]],
           labels [[-100, -100, 7, 8, 9]], logp_source [1, 2, 1], logp_target [7, 8, 9], logp_slot [0, 0, 1],
           logp_offset [0, 1, 0],
           attention_mask (1 = attend) [[1, 0, 0, 0, 0],
                                        [1, 1, 0, 0, 0],
                                        [1, 1, 1, 0, 0],
                                        [1, 1, 1, 1, 0],
                                        [1, 1, 0, 0, 1]]   <- rejected sees the prompt, not chosen
           num_tokens 5, num_pairs 1
    """

    pad_token_id: int
    pad_to_multiple_of: int = 1
    shared_mask: str | None = None
    """The attention implementation the one-row layout builds its mask for (bool for sdpa, additive for eager),
    or None: each response repeats its prompt."""

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        if self.shared_mask is None:
            prompts = [row["prompt_ids"] for row in rows] * 2
            responses = [row["chosen_ids"] for row in rows] + [row["rejected_ids"] for row in rows]
            batch = pad_responses(prompts, responses, self.pad_token_id, self.pad_to_multiple_of)
        else:
            batch = self.shared_rows(rows)
        if "row" in rows[0]:
            batch["row"] = torch.tensor([row["row"] for row in rows])
        return {**batch, "num_pairs": torch.tensor(len(rows))}

    def shared_rows(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """One row per pair: prompt, chosen, rejected (`shared_prompt_rows`); pair b's sequences are b and B + b."""
        pairs = len(rows)
        return shared_prompt_rows([row["prompt_ids"] for row in rows],
                                  [[row["chosen_ids"], row["rejected_ids"]] for row in rows],
                                  [[index, pairs + index] for index in range(pairs)],
                                  self.pad_token_id, self.pad_to_multiple_of, self.shared_mask)


def shared_prompt_rows(prompts: list[list[int]], responses: list[list[list[int]]], slots: list[list[int]],
                       pad_token_id: int, multiple: int, attn_implementation: str) -> dict[str, torch.Tensor]:
    """One row per prompt: the prompt once, then each of its responses, every response token labelled.

    DPO's pairs (two responses) and GRPO's groups (a prompt's completions) train this way: each response attends to
    the prompt and to itself only (`shared_prompt_mask`) and its positions continue from the prompt's end, so each
    of its tokens gets the hidden state it would get in a row of its own, and the prompt is computed once.

    Args:
        prompts: each row's prompt.
        responses: each row's responses, in the order they follow the prompt (an empty one takes no place).
        slots: each response's sequence number in the batch (what `logp_slot` says of its tokens).
        pad_token_id: what pads rows to one width.
        multiple: the width is rounded up to this.
        attn_implementation: `sdpa` (a bool mask) or `eager` (an additive one).

    Returns:
        `input_ids`, `labels`, `position_ids`, `attention_mask` (4D), `num_tokens` (real tokens), and per response
        token, in order: `logp_source` (the flat index, row * width + place, of the hidden state that predicts it:
        a response's first token is predicted from the prompt's last place), `logp_target` (the token),
        `logp_slot` (its sequence) and `logp_offset` (its place in its response).
    """
    lengths = [len(prompt) + sum(map(len, answers)) for prompt, answers in zip(prompts, responses, strict=True)]
    width = padded_width(max(lengths), multiple)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(prompts), width), dtype=torch.long)
    segment = torch.arange(width).neg().sub(1).repeat(len(prompts), 1)  # padding: a negative segment per position
    source, target, slot, offset = [], [], [], []
    for index, (prompt, answers, answer_slots) in enumerate(zip(prompts, responses, slots, strict=True)):
        p, base = len(prompt), index * width
        ids, positions, segments = [*prompt], [*range(p)], [0] * p
        for number, (answer, answer_slot) in enumerate(zip(answers, answer_slots, strict=True), start=1):
            start, n = len(ids), len(answer)
            source += [base + (p - 1 if k == 0 else start + k - 1) for k in range(n)]
            target += answer
            slot += [answer_slot] * n
            offset += range(n)
            ids += answer
            positions += range(p, p + n)
            segments += [number] * n
        input_ids[index, :len(ids)] = torch.tensor(ids)
        labels[index, p:len(ids)] = input_ids[index, p:len(ids)]
        position_ids[index, :len(ids)] = torch.tensor(positions)
        segment[index, :len(ids)] = torch.tensor(segments)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "attention_mask": shared_prompt_mask(segment, attn_implementation),
            **{f"logp_{key}": torch.tensor(values, dtype=torch.long)
               for key, values in (("source", source), ("target", target), ("slot", slot), ("offset", offset))},
            "num_tokens": torch.tensor(sum(lengths))}


def shared_prompt_mask(segment: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """The (batch, 1, width, width) causal mask of shared-prompt rows, bool for sdpa (True = attend), else additive.

    A token sees earlier tokens of its own segment and, in a response (segment 1, 2, ...), the prompt (segment 0).
    Padding (a negative segment per position) sees itself only, so no softmax row is empty.
    """
    query, key = segment.unsqueeze(2), segment.unsqueeze(1)
    allowed = ((query == key) | ((key == 0) & (query > 0))) & torch.ones(segment.size(1), segment.size(1),
                                                                         dtype=torch.bool).tril()
    return attention_mask(allowed.unsqueeze(1), None if attn_implementation == "sdpa" else torch.float32)


@dataclass
class KtoCollator:
    """Batch unpaired rows (KTO): prompt + completion per row, its label, and the mismatched pairs of KTO's KL term.

    Rows hold `prompt_ids`, `completion_ids`, `label`. Besides `input_ids`, `attention_mask`, `labels` [B, L],
    `kto_label` [B] and `num_tokens` (real tokens of those rows), the batch has `kl_input_ids`,
    `kl_attention_mask`, `kl_labels` [B, L']: row i's prompt with row i-1's completion (cyclically), as TRL's
    KTOTrainer pairs them to estimate the KL term.

    Example, pad_token_id=0: rows (prompt [5], completion [7, 8], true), (prompt [6], completion [9], false)
        -> input_ids [[5, 7, 8], [6, 9, 0]], kto_label [True, False], kl_input_ids [[5, 9, 0], [6, 7, 8]]
    """

    pad_token_id: int
    pad_to_multiple_of: int = 1

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        prompts = [row["prompt_ids"] for row in rows]
        completions = [row["completion_ids"] for row in rows]
        batch = pad_responses(prompts, completions, self.pad_token_id, self.pad_to_multiple_of)
        kl = pad_responses(prompts, completions[-1:] + completions[:-1], self.pad_token_id, self.pad_to_multiple_of)
        return {**batch, "kto_label": torch.tensor([bool(row["label"]) for row in rows], dtype=torch.bool),
                **{f"kl_{key}": kl[key] for key in ("input_ids", "attention_mask", "labels")}}


def pad_responses(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int,
                  multiple: int) -> dict[str, torch.Tensor]:
    """Right-padded rows of prompt + response, labelled on the response only, with their real-token count."""
    lengths = [len(prompt) + len(response) for prompt, response in zip(prompts, responses, strict=True)]
    width = padded_width(max(lengths), multiple)
    input_ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(lengths), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for row, (prompt, response, length) in enumerate(zip(prompts, responses, lengths, strict=True)):
        input_ids[row, :length] = torch.tensor([*prompt, *response])
        labels[row, len(prompt) : length] = torch.tensor(response)
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "num_tokens": attention_mask.sum()}


def padded_width(longest: int, multiple: int) -> int:
    """The width a batch whose longest row has `longest` tokens is padded to: rounded up to `multiple`."""
    return -(-longest // multiple) * multiple


def build_collator(cfg: DataCfg, pad_token_id: int, attn_implementation: str) -> PadCollator | PackedCollator:
    """The collator for rows as `data.packing` shapes them: packed with their document masks, or padded."""
    multiple = pad_multiple(cfg.pad_to_multiple_of)
    if cfg.packing:
        return PackedCollator(pad_token_id, attn_implementation, pad_to_multiple_of=multiple)
    return PadCollator(pad_token_id, multiple)


def pad_multiple(configured: int) -> int:
    """`data.pad_to_multiple_of`, its 0 (the default) resolved for the device this machine trains on.

    A GPU gets multiples of 8, which tensor-core matmul and attention kernels prefer. A CPU gets no rounding: its
    kernels gain nothing from it and compute each pad slot for nothing: on short chat batches rounding to 8
    about doubles the padded slots (docs/benchmarks.md).
    """
    return configured or (GPU_PAD_MULTIPLE if local_device() == "cuda" else 1)
