"""Typed run configuration: one dataclass per concern, the only place defaults live.

Hydra composes recipe YAML into these structured configs, so an unknown key or a value of the wrong type
fails at composition. Allowed values and ranges are declared next to each field (`choices`, `min`, `max`
metadata) and checked by `config.validate`, which reads them from here rather than repeating them.

This module imports nothing of torch or the rest of ftune: a config can be checked before anything loads.
"""

import ast
import inspect
from dataclasses import dataclass, field
from functools import cache
from typing import Any


def choice(default: str, *choices: str) -> Any:
    """A string field restricted to `choices` (OmegaConf 2.3 has no `Literal`, so validate checks it)."""
    return field(default=default, metadata={"choices": (default, *choices)})


def registry_choice(default: str, registry: str, *extra: str) -> Any:
    """A string field whose allowed values are `default`, `extra` and the keys of a registry (`module:NAME`).

    The registry is the dict that implements the options (data formats, PEFT methods, optimizers), read when a
    config is validated, so a new option is added in one place. Validation imports it (and so may import
    torch), but loads nothing.
    """
    return field(default=default, metadata={"registry": registry, "extra": (default, *extra)})


def bounded(default: float | int, low: float | None = None, high: float | None = None) -> Any:
    """A numeric field that must lie in [low, high] (either bound may be open)."""
    return field(default=default, metadata={"min": low, "max": high})


@cache
def field_docs(node: type) -> dict[str, str]:
    """The first sentence of each field's docstring (the string literal after it), for help and `ftune init`.

    Python keeps no attribute docstrings at run time, so they are read from this module's source.
    """
    tree = ast.parse(inspect.getsource(node))
    body = tree.body[0].body
    docs = {}
    for stmt, after in zip(body, body[1:], strict=False):
        if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[stmt.target.id] = " ".join(str(after.value.value).split()).split(". ")[0].rstrip(".") + "."
    return docs


@dataclass
class ModelCfg:
    name_or_path: str = "${ftune_asset:models/tiny}"
    """A hub id or a local directory with config.json, weights and tokenizer."""
    dtype: str = choice("fp32", "bf16", "fp16")
    """Dtype the weights are loaded in (trainable weights stay in it; use trainer.mixed_precision for autocast)."""
    attn_implementation: str = choice("sdpa", "eager", "flash_attention_2")
    """Attention kernel passed to transformers."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about a third more compute."""
    adapter: str | None = None
    """A trained adapter directory (a run's final/) to start from: its weights are loaded and trained on (with the
    same method). A preference objective then takes the model with this adapter, not the bare base, as its
    reference."""
    add_tokens: list[str] = field(default_factory=list)
    """Tokens added to the tokenizer (each never split), with embedding and output-head rows that start at the mean
    of the existing rows and train: in full with method=full, alone beside a LoRA adapter (method=lora and its
    variants). Each must be new to the tokenizer."""
    add_special_tokens: list[str] = field(default_factory=list)
    """As add_tokens, but added as special tokens (skip_special_tokens drops them when decoding): an end-of-turn
    marker such as `<|end|>` that a chat template needs and the tokenizer lacks."""


FORMATS_REGISTRY = "ftune.data.formats:FORMATS"
"""The record formats; `auto` (detect from the first record) is allowed besides them."""


CANONICAL_ROLES = ("system", "user", "assistant", "tool")
"""The roles of ftune's canonical messages; `data.roles` maps a dataset's names onto these."""
TOOL_CALL_ROLE = "tool_call"
"""A pseudo-role `data.roles` may map a ShareGPT name to: an assistant turn whose value is its tool call(s)."""
MAPPABLE_ROLES = (*CANONICAL_ROLES, TOOL_CALL_ROLE)


@dataclass
class DataSourceCfg:
    """One entry of `data.mix`: a data source and its share of the training examples."""

    path: str = "???"
    """A file, directory or hub id, as `data.path` takes it."""
    weight: float = 1.0
    """Relative share of the mixed training examples drawn from this source (see `data.mix`); must be > 0."""
    format: str = registry_choice("auto", FORMATS_REGISTRY)
    """Record format of this source, as `data.format` (which applies to `path` and `eval_path` only)."""


@dataclass
class DataCfg:
    path: str = "${ftune_asset:data/chat/train.jsonl}"
    """Training data: a .jsonl, .json (a list of records), .parquet or .csv file; a directory of such files
    (or one written by datasets' `save_to_disk`); or a `datasets` hub id, `ID` or `ID:SPLIT` (default train)."""
    eval_path: str | None = "${ftune_asset:data/chat/validation.jsonl}"
    """Held-out data for evaluation, any source `path` takes; null disables evaluation."""
    format: str = registry_choice("auto", FORMATS_REGISTRY)
    """Record format; `auto` detects it from the fields of each source's first record (see ftune.data.formats)."""
    roles: dict[str, str] = field(
        default_factory=lambda: {
            "system": "system",
            "human": "user",
            "user": "user",
            "gpt": "assistant",
            "assistant": "assistant",
            "tool": "tool",
        }
    )
    """ShareGPT `from` names -> ftune roles (system, user, assistant, tool); add one with +data.roles.NAME=ROLE."""
    mix: list[DataSourceCfg] = field(default_factory=list)
    """Training sources mixed by weight, replacing `path` when non-empty, e.g. chat data plus a replay share of
    general text: `[{path: chat.jsonl, weight: 0.8}, {path: text.jsonl, weight: 0.2}]`. Each weight / sum of
    weights is the share of training examples drawn from that source; the mix is the largest that repeats no
    example (the source scarcest for its weight is taken whole, the others subsampled, seeded by `seed`)."""
    on_bad_record: str = choice("error", "skip")
    """A record that does not fit its format stops the run (`error`) or is skipped and counted by reason (`skip`)."""
    chat_template: str = "tokenizer"
    """`tokenizer` for the tokenizer's own template, or a name from ftune.data.templates."""
    train_on: str = choice("all_assistant", "last_assistant", "everything")
    """Which tokens are learned; all others get the ignore label."""
    max_length: int = bounded(512, 8)
    """Tokens per example; longer examples are truncated at the end, keeping the prompt's start. Preference data:
    tokens per prompt + response; the prompt is cut from the left and a pair whose response does not fit is dropped."""
    max_prompt_length: int = bounded(0, 0)
    """Preference data: prompts longer than this are cut from the left (keeping a leading BOS); 0 = no limit of its
    own (only max_length)."""
    columns: dict[str, str] = field(default_factory=dict)
    """Canonical field -> the column a source names it, for data whose columns are named otherwise: `{prompt: input,
    chosen: good}` in a recipe, +data.columns.prompt=input on the command line; each column named must be in the
    first record."""
    packing: bool = False
    """Pack several examples into each row of max_length tokens instead of padding each one."""
    pad_to_multiple_of: int = bounded(0, 0)
    """Padded batch lengths are rounded up to this; 0: 8 when training on a GPU (tensor-core kernels), 1 on CPU,
    which computes every pad slot for nothing (see ftune.data.collate.pad_multiple)."""
    group_by_length: bool = False
    """Without packing, batch examples of similar length (shuffled within windows of 50 batches) so padding
    wastes few slots; measured fastest on CPU for short chat data (docs/benchmarks.md)."""
    train_on_reasoning: bool = True
    """Learn the reasoning (`<think>` block) of assistant turns wherever the chat template renders it. Qwen3's
    renders it only after the last user query, so ftune learns each earlier turn in an example that ends with
    it; false keeps the reasoning in the input but out of the loss."""
    dedup: str = choice("none", "exact", "near")
    """Remove training examples that duplicate another (exactly, or `near`: MinHash Jaccard >= 0.8 over character
    5-grams of the conversation without its system turn) or the eval set; `none` only reports them."""
    num_proc: int = bounded(0, 0)
    """Worker processes that tokenize and label records (rows are identical for any number); 0 = the cores this
    process may use, at most 8."""
    check_labels: str = choice("sample", "all")
    """Every learned span is checked against token boundaries; `sample` also decodes the learned tokens of every
    16th record (and of any span a token straddles) and compares them with the text, `all` decodes every record."""
    streaming: bool = False
    """Read the training data lazily and tokenize, shuffle and pack it while training, for sets that do not fit in
    memory or on disk: no cache, no statistics up front; needs trainer.max_steps (see ftune.data.stream). Held-out
    data is built as usual."""
    shuffle_buffer: int = bounded(10000, 0)
    """Streaming: examples held by the buffer that shuffles the stream, reshuffled each pass from `seed`; 0 keeps
    the source's order. It holds up to this many examples of at most max_length tokens (8 bytes a token)."""


@dataclass
class QuantCfg:
    bits: int = 0
    """Load the base quantized by bitsandbytes to 4 or 8 bits (QLoRA); 0 keeps it in model.dtype."""
    type: str = choice("nf4", "fp4")
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves ~0.4 bit per weight)."""
    compute_dtype: str = choice("auto", "bf16", "fp16", "fp32")
    """Dtype of the matmuls on dequantized weights. `auto`: bf16 where the device computes it natively (recent
    GPUs, CPUs with bf16 instructions; no fp16 overflow), else fp32 (emulated bf16 is many times slower)."""


@dataclass
class AdaloraCfg:
    """AdaLoRA's rank allocation (`method=adalora`; PEFT's AdaLoraConfig).

    Each adapted matrix starts at rank `lora.r` and the total rank is cut, by a cubic schedule, to `target_r` per
    matrix on average, keeping the singular directions whose importance (|weight x gradient|, smoothed) is highest.
    """

    target_r: int = bounded(8, 1)
    """Average rank per adapted matrix once the budget is allocated (at most `lora.r`, the starting rank)."""
    warmup: float = bounded(0.1, 0.0, 1.0)
    """Fraction of the optimizer steps trained at the full starting rank before any is cut (PEFT's tinit)."""
    final: float = bounded(0.2, 0.0, 1.0)
    """Fraction of the optimizer steps, at the end, trained with the final allocation fixed (PEFT's tfinal)."""
    every: int = bounded(1, 1)
    """Optimizer steps between two reallocations while the budget shrinks (PEFT's deltaT)."""
    beta1: float = bounded(0.85, 0.0, 1.0)
    """Smoothing of the importance scores (an exponential moving average)."""
    beta2: float = bounded(0.85, 0.0, 1.0)
    """Smoothing of their uncertainty."""
    orth_reg_weight: float = bounded(0.5, 0.0)
    """Weight of the penalty that keeps the singular vectors orthogonal, added to the loss and logged as
    `orth_loss`."""


@dataclass
class MethodCfg:
    name: str = registry_choice("lora", "ftune.model.adapters:PEFT_CONFIGS", "full")
    """What trains: LoRA adapters (QLoRA with quant.bits=4), every weight, or another PEFT method."""
    freeze: list[str] = field(default_factory=list)
    """Full fine-tuning: regexes of parameter names that stay frozen (e.g. embeddings, the first layers)."""
    train_only: list[str] = field(default_factory=list)
    """Full fine-tuning: regexes of the only parameter names that train (empty: all but `freeze`'s). `method=bitfit`
    sets it to the bias terms (BitFit)."""
    num_virtual_tokens: int = bounded(20, 1)
    """Prompt and prefix tuning: number of learned virtual tokens."""
    unfreeze_every: int = bounded(0, 0)
    """Gradual unfreezing (full fine-tuning): the head and the last block train first, and every `unfreeze_every`
    optimizer steps the next block down joins (the input embedding last); training rows log `trainable_params`.
    0: everything trains from the start."""
    adalora: AdaloraCfg = field(default_factory=AdaloraCfg)
    """`method=adalora`'s rank allocation."""


@dataclass
class LoraCfg:
    r: int = bounded(8, 1)
    """Rank of the update matrices."""
    alpha: float = bounded(16.0, 0.0)
    """Scale of the update: the adapter output is multiplied by alpha / r."""
    dropout: float = bounded(0.05, 0.0, 1.0)
    """Dropout on the adapter input. PEFT draws an independent mask over the full input of every adapted module
    (q, k and v each their own), which has no exact cheaper form: one shared mask would correlate the adapters'
    noise. It is not free: a sizeable share of a CPU step on small models (docs/benchmarks.md), and one mask per
    adapted module kept for the backward (`ftune plan` counts them). 0 turns it off."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt, or a preset: `all-linear` (every linear layer but the head), `attention`."""
    rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r."""
    dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head after adding tokens)."""
    init: str = choice("default", "gaussian", "pissa", "olora", "loftq", "eva")
    """Initialisation of the adapter matrices (PEFT's init_lora_weights). `loftq` (QLoRA, quant.bits=4): the
    adapters start at the best rank-r correction of the 4-bit base's quantization error. `eva`: A starts at the
    principal directions of each layer's inputs on the training data (computed before the first step)."""


@dataclass
class OptimCfg:
    name: str = registry_choice("adamw", "ftune.train.optim:BNB_OPTIMIZERS")
    """Optimizer: torch's AdamW or a bitsandbytes 8-bit / paged variant."""
    lr: float = bounded(2e-4, 0.0)
    """Peak learning rate."""
    weight_decay: float = bounded(0.0, 0.0)
    """Decoupled weight decay; never applied to biases and norm weights."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Adam moment coefficients."""
    eps: float = bounded(1e-8, 0.0)
    """Adam epsilon."""
    scheduler: str = choice("cosine", "linear", "constant")
    """Learning-rate schedule after warmup (transformers' schedulers)."""
    warmup_ratio: float = bounded(0.03, 0.0, 1.0)
    """Fraction of the optimizer steps spent warming up linearly from 0."""
    max_grad_norm: float = bounded(1.0, 0.0)
    """Clip the global gradient norm to this; 0 disables clipping."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: learning rate of the B matrices over that of the A matrices (e.g. 16); null: same rate."""


@dataclass
class DistillCfg:
    teacher: str | None = None
    """Teacher model (hub id or directory) of `objective=distill`. With `mode=logits` it must share the student's
    vocabulary; with `mode=sequence` only text passes, so any tokenizer will do."""
    mode: str = choice("logits", "sequence")
    """What the student learns from the teacher: `logits`, its distribution at every learned token (the KL term
    beside the labels' cross-entropy); `sequence`, its answers: before training the teacher answers every training
    prompt once (cached, `responses`) and the student trains on those answers as `objective=sft` would, without
    the teacher in memory (docs/training.md)."""
    alpha: float = bounded(0.5, 0.0, 1.0)
    """Weight of the cross-entropy on labels; (1 - alpha) weighs the KL to the teacher."""
    temperature: float = bounded(2.0, 0.0)
    """Softmax temperature of both distributions in the KL term (scaled back by T^2)."""
    teacher_bits: int = 0
    """Load the teacher quantized to 4 or 8 bits; 0 keeps it in model.dtype."""
    sample_temperature: float = bounded(0.0, 0.0)
    """`mode=sequence`: 0 answers greedily; above 0 samples each answer at this temperature, seeded by `seed`
    (`temperature` is the KL's)."""
    max_new_tokens: int = bounded(256, 1)
    """`mode=sequence`: the longest answer the teacher writes, in its tokens (a longer one is cut, and counted)."""
    responses: str | None = None
    """`mode=sequence`: the JSONL of the teacher's answers the student trains on (canonical `messages`, under
    $FTUNE_CACHE/teacher), filled in by `ftune train` before anything loads so that config.yaml records it; a value
    given is replaced."""


PREFERENCE_OBJECTIVES = ("dpo", "kto")
"""Objectives that learn from preference data (`ftune.data.preference`, `pref.*`) rather than labelled examples."""
REFERENCE_FREE_LOSSES = ("simpo", "orpo")
"""`pref.loss` values that need no reference model."""


@dataclass
class ObjectiveCfg:
    name: str = choice("sft", "distill", "dpo", "kto", "grpo")
    """What the run learns from (whatever `method` trains): `sft` the labelled tokens; `distill` labels and a frozen
    teacher (`distill.*`); `dpo` preference pairs (`pref.*`); `kto` completions labelled desirable or not; `grpo`
    prompts and the user's reward functions, on completions sampled from the policy as it trains (`grpo.*`)."""

    @property
    def learns_preferences(self) -> bool:
        return self.name in PREFERENCE_OBJECTIVES

    @property
    def samples_completions(self) -> bool:
        """Whether the run samples its completions from the model as it trains (GRPO): its data are prompts."""
        return self.name == "grpo"


@dataclass
class PrefCfg:
    beta: float = bounded(0.1, 0.0)
    """How far the policy may move from the reference (DPO's beta; IPO's tau); must be > 0."""
    loss: str = choice("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
    """DPO's loss on the pair's log-ratio margin, as TRL defines it: `sigmoid` (DPO), `ipo`, `hinge`, `robust`
    (noisy labels, `label_smoothing`), or the reference-free `simpo` (length-normalised, `simpo_gamma`) and `orpo`
    (odds ratio plus the chosen response's NLL)."""
    label_smoothing: float = bounded(0.0, 0.0, 0.5)
    """`robust`: the assumed share of pairs whose labels are flipped (below 0.5)."""
    simpo_gamma: float = bounded(0.5, 0.0)
    """`simpo`: the target reward margin (TRL's default)."""
    sft_weight: float = bounded(0.0, 0.0)
    """Weight of an NLL term on the chosen response (RPO), averaged over its tokens; 0 turns it off."""
    desirable_weight: float = bounded(1.0, 0.0)
    """`objective=kto`: weight of the desirable completions' loss."""
    undesirable_weight: float = bounded(1.0, 0.0)
    """`objective=kto`: weight of the undesirable completions' loss."""
    dropout: bool = False
    """Keep dropout on in the policy and the reference; off (as TRL does), the policy equals the reference at
    step 0 and the first sigmoid loss is exactly ln 2."""
    reference: str = choice("model", "precompute")
    """Where the reference's log-probs come from. `model`: a forward at every step (an adapter method's policy
    with its adapter off or the start adapter switched in; full fine-tuning's frozen copy). `precompute`: every
    pair's, train and held-out, once before the first step with the weights training starts from, cached on disk
    by model and data and reused on resume and by the next run: no reference forward per step and, for full
    fine-tuning, no second copy of the model in memory. objective=dpo with a loss that uses a reference."""
    share_prompt: bool = True
    """`objective=dpo`: one row per pair, the prompt once with both responses after it, each response attending
    to the prompt and to itself only (a 4D mask; positions continue from the prompt's end), instead of two rows
    that repeat the prompt: the same log-probs for less work. Used where the model's attention takes such a mask
    and a probe pair at start gives the two layouts' log-probs equal; else (flash-attention, prompt or prefix
    tuning, a layer a mask cannot steer) each response repeats its prompt, and the run's table says why."""


@dataclass
class GrpoCfg:
    num_generations: int = bounded(8, 2)
    """Completions sampled per prompt (a group); each one's advantage is its reward against its group's."""
    reward_funcs: list[str] = field(default_factory=list)
    """The reward functions, each `path/to/file.py:function` (relative to the current directory) or
    `package.module:function`, with TRL's signature `fn(prompts, completions, **columns) -> list[float | None]`;
    every column of the prompts file but `prompt` arrives by name. Required with objective=grpo."""
    reward_weights: list[float] | None = None
    """One weight per reward function (null: all 1); the reward is the weighted sum."""
    loss: str = choice("dapo", "grpo", "bnpo", "dr_grpo")
    """How the per-token loss is averaged, as TRL defines it: `dapo` (TRL's default) and `bnpo` over the step's
    completion tokens, `grpo` over each completion's tokens then over completions, `dr_grpo` over completions x
    max_completion_length. ftune divides by the whole step's count, so every type is exact under accumulation."""
    scale_rewards: str = choice("group", "batch", "none")
    """Divide advantages by the group's reward std (`group`, TRL's default), the batch's (`batch`), or not at all
    (`none`, as Dr. GRPO argues: the std favours groups that are almost all right or all wrong)."""
    epsilon: float = bounded(0.2, 0.0)
    """The importance ratio is clipped to [1 - epsilon, 1 + epsilon_high]."""
    epsilon_high: float | None = None
    """Upper clip (DAPO's clip-higher, e.g. 0.28); null: epsilon."""
    beta: float = bounded(0.0, 0.0)
    """Weight of the KL term to the reference (TRL's k3 estimate); 0, TRL's default, needs no reference. The
    reference is the policy with its adapter off (LoRA, QLoRA) or a frozen copy (full fine-tuning)."""
    max_completion_length: int = bounded(64, 1)
    """Most tokens sampled per completion; data.max_length must leave room for it after the prompt."""
    temperature: float = bounded(1.0, 0.0)
    """Sampling temperature (> 0)."""
    top_p: float = bounded(1.0, 0.0, 1.0)
    """Nucleus sampling: the smallest set of tokens whose probabilities reach top_p (1: all)."""
    num_iterations: int = bounded(1, 1)
    """Optimizer steps taken on each batch of completions (TRL's `num_iterations`, the mu of the GRPO paper): the
    same prompts train for this many steps, the later ones with importance ratios against the log-probs the
    completions were sampled with. An epoch then counts this many steps per batch, and its last, incomplete step is
    left out, as TRL leaves out an incomplete generation batch."""
    mask_truncated_completions: bool = False
    """Leave completions cut at max_completion_length out of the loss (they still count in grpo's and dr_grpo's
    averages, as TRL counts them): a cut answer is not rewarded or punished for an ending it never reached."""
    share_prompt: bool = True
    """Train each prompt's group in one row: the prompt once, then each completion, attending to the prompt and to
    itself only (a 4D mask; positions continue from the prompt's end), instead of a row per completion that repeats
    the prompt: the same log-probs for less work. Used where the model passes the probe `pref.share_prompt` uses
    (else, as with flash-attention or prompt tuning, a row per completion, and the run's table says why)."""


@dataclass
class EwcCfg:
    weight: float = bounded(0.0, 0.0)
    """EWC: the weight of sum_i F_i (theta_i - theta*_i)^2 added to the loss, F the base's Fisher diagonal on the
    probe text and theta* the base weights (logged as `ewc_loss`); 0 turns it off. For weights that train (full
    fine-tuning, BitFit) with the `sft` and `distill` objectives, and a `probe.path`."""
    batches: int = bounded(16, 1)
    """Probe batches the Fisher diagonal is estimated from (once per base and probe: it is cached)."""


@dataclass
class GenerationCfg:
    backend: str = registry_choice("transformers", "ftune.eval.generation:GENERATION_BACKENDS")
    """What samples an online objective's completions (`objective=grpo`): `transformers` (its `generate` on the
    policy, in the training process, with a KV cache; on CPU the adapter merged while sampling). docs/grpo.md says
    what a vLLM backend would take and buy."""


@dataclass
class TrainerCfg:
    max_steps: int = bounded(-1, -1)
    """Optimizer steps to run; -1 runs `epochs` full passes instead."""
    epochs: int = bounded(1, 1)
    """Passes over the training data (when max_steps is -1)."""
    micro_batch_size: int = bounded(8, 1)
    """Examples per forward/backward pass on each process."""
    grad_accum: int = bounded(1, 1)
    """Micro-batches per optimizer step; the loss is averaged over every learned token of the step."""
    neftune_alpha: float = bounded(0.0, 0.0)
    """NEFTune: uniform noise of scale alpha / sqrt(L x d) added to the input embeddings in training forwards only
    (L the row's length, d the hidden size; the paper uses 5); evaluation, the probe and sampling see none. 0: off.
    For the token objectives (sft, distill)."""
    mixed_precision: str = choice("auto", "no", "bf16", "fp16")
    """Autocast dtype for the forward pass (accelerate); master weights stay in model.dtype. `auto`: what the
    device computes natively (bf16 on recent GPUs, fp16 on older ones, bf16 on CPUs with bf16 instructions, else
    none); config.yaml records the choice, and `ftune plan` resolves it for the device it plans for."""
    eval_every: int = bounded(50, 0)
    """Evaluate every this many optimizer steps (0: only at the end)."""
    eval_batches: int = bounded(-1, -1)
    """Validation micro-batches per evaluation (-1: all)."""
    eval_on_start: bool = False
    """Evaluate the base model before the first step and log it as step 0, so every curve starts at the base."""
    sample_every: int = bounded(0, 0)
    """Every this many optimizer steps (and at the last), answer the first `sample_prompts` held-out
    conversations greedily and append the answers to the run's generations.jsonl (0: never)."""
    sample_prompts: int = bounded(4, 1)
    """How many held-out conversations `sample_every` answers, the same ones each time."""
    save_every: int = bounded(0, 0)
    """Save a checkpoint every this many optimizer steps (0: only the final artefact)."""
    keep_last: int = bounded(2, 1)
    """Checkpoints kept (newest first)."""
    log_every: int = bounded(1, 1)
    """Write a training row to metrics.jsonl every this many optimizer steps."""
    num_workers: int = bounded(0, 0)
    """DataLoader worker processes."""
    compile: bool = False
    """Compile each decoder layer with torch.compile (inductor, through accelerate's regional compilation). The
    first steps pay the compile time; fixed shapes (packing) avoid recompiles. On CPU it gained little after
    warm-up (docs/benchmarks.md): meant for GPUs and long runs."""
    cpu_kernels: str = choice("auto", "on", "off")
    """ftune's CPU kernels (ftune/kernels/: the fused LoRA linear, LoRA dropout drawn as positions, freed host memory
    kept for reuse): `auto` uses them when training on a CPU and not elsewhere. They compute what PEFT and torch
    compute, faster on a CPU (docs/benchmarks.md); the start table lists what they changed."""
    nan_guard: bool = True
    """Stop with exit code 3 (after saving the last good state) when a step's loss is not finite."""
    loss_chunk_size: int = bounded(256, 0)
    """Tokens per chunk of the loss: the head and the loss run this many tokens at a time from the last hidden
    states, so the [tokens, vocab] logits never exist (one chunk's: 256 x 128,256 fp32 = 131 MB). Larger chunks
    are a little faster and hold proportionally more memory (docs/benchmarks.md, "The loss variants alone"). 0
    computes the full logits (the unfused loss)."""
    loss_recompute: bool = False
    """Chunked loss only: recompute each chunk's logits in the backward instead of computing their gradient in
    the forward pass (one more head matmul per step, no gradient buffers held until the backward)."""
    final_weights: str = choice("best", "last")
    """What final/ holds: the best evaluation's weights (needs evaluation; each improvement is checkpointed) or the
    last step's (checkpoints then come only from `save_every`)."""


@dataclass
class EarlyStopCfg:
    metric: str = "auto"
    """Evaluation metric that decides the best checkpoint and early stopping: one the configured evaluation
    measures (eval_loss, eval_ppl, probe_ppl, probe_drift; with a preference objective eval_reward_accuracy and
    eval_reward_margin instead of eval_ppl), or `auto`: the objective's own (eval_loss; eval_reward_accuracy,
    larger is better, for dpo and kto), or probe_ppl without data.eval_path, or none without any evaluation (then
    final/ holds the last weights)."""
    mode: str = choice("min", "max")
    """Whether smaller or larger values of the metric are better."""
    patience: int = bounded(0, 0)
    """Stop after this many evaluations without improvement; 0 never stops early."""
    min_delta: float = bounded(0.0, 0.0)
    """An evaluation improves only if it beats the best by more than this."""


@dataclass
class ProbeCfg:
    path: str | None = "${ftune_asset:data/probe/general.jsonl}"
    """General text (`{"text": ...}` JSONL) whose perplexity measures forgetting; null disables the probe."""
    max_length: int = bounded(256, 8)
    """Tokens per probe document."""
    tasks: list[str] = field(default_factory=list)
    """lm-eval tasks scored at every evaluation against the base model (the shipped, offline `tinyworld_tense`, or
    lm-eval's own such as `hellaswag`): `<task>_score` and `<task>_drift` in metrics.jsonl; needs `ftune[eval]`."""
    limit: int | None = None
    """Examples per probe task (lm-eval's `limit`; null: all of them, at every evaluation)."""
    task_dir: str | None = None
    """A directory of your own lm-eval task YAML, searched before lm-eval's registry."""
    max_drift: float | None = None
    """Stop when the model gets worse than the base by more than this fraction (e.g. 0.1) on the probe: its
    perplexity rises by it, or a probe task's score falls by it."""


@dataclass
class LoggerCfg:
    name: str = choice("none", "wandb", "tensorboard")
    """Where metrics go besides metrics.jsonl and the console."""
    project: str = "ftune"
    """wandb project."""
    run_name: str | None = None
    """wandb run name / tensorboard sub-directory; null uses the run directory's name."""
    tags: list[str] = field(default_factory=list)
    """wandb tags."""


@dataclass
class RunCfg:
    """A complete run: what `ftune train` validates before anything loads."""

    recipe: str = "tiny_lora"
    """Name of the recipe this run was composed from (a shipped one, or the stem of the user's file)."""
    seed: int = 42
    """Seeds python, numpy and torch, and the data order."""
    output_dir: str = "runs/${recipe}/${now:%Y%m%d-%H%M%S}"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, final/, summary.json."""
    resume: str | None = None
    """`auto` for the newest checkpoint in output_dir, or a checkpoint path; null starts fresh."""
    resume_force: bool = False
    """Resume although the config changed in a way that breaks exact resume (data, model, method, batch shape,
    seed); the changed keys are recorded in metrics.jsonl and summary.json."""
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    method: MethodCfg = field(default_factory=MethodCfg)
    quant: QuantCfg = field(default_factory=QuantCfg)
    lora: LoraCfg = field(default_factory=LoraCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    objective: ObjectiveCfg = field(default_factory=ObjectiveCfg)
    distill: DistillCfg = field(default_factory=DistillCfg)
    pref: PrefCfg = field(default_factory=PrefCfg)
    grpo: GrpoCfg = field(default_factory=GrpoCfg)
    generation: GenerationCfg = field(default_factory=GenerationCfg)
    ewc: EwcCfg = field(default_factory=EwcCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)
    early_stop: EarlyStopCfg = field(default_factory=EarlyStopCfg)
    probe: ProbeCfg = field(default_factory=ProbeCfg)
    logger: LoggerCfg = field(default_factory=LoggerCfg)

    @property
    def uses_reference(self) -> bool:
        """Whether the objective compares the policy with a reference (KTO, DPO but its free losses, GRPO's KL)."""
        return self.objective.name == "kto" or \
            self.objective.name == "dpo" and self.pref.loss not in REFERENCE_FREE_LOSSES or \
            self.objective.name == "grpo" and self.grpo.beta > 0

    @property
    def keeps_reference_model(self) -> bool:
        """Whether the reference runs at every step (not precomputed): full fine-tuning then keeps a frozen copy.

        GRPO's completions are sampled as it trains, so its reference always runs (`pref.reference` is DPO's).
        """
        return self.uses_reference and (self.objective.name == "grpo" or self.pref.reference == "model")
