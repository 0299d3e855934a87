"""Load the tokenizer and the base model, then settle what trains: adapters (PEFT) or every unfrozen weight.

The method is decided here and nowhere else, so the training loop is the same for every method. Quantization
(QLoRA, a 4/8-bit teacher) comes from `model/quant.py`, and the distillation teacher is loaded here too.
"""

import dataclasses
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from accelerate import PartialState
from huggingface_hub import snapshot_download
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ftune.config.schema import ModelCfg, RunCfg
from ftune.device import local_device
from ftune.errors import ConfigError, ResourceError
from ftune.kernels import kernels_on
from ftune.model.adapters import add_adapter, eva_init, loftq_init
from ftune.model.dtypes import DTYPES
from ftune.model.instrument import instrument
from ftune.model.quant import prepare_quantized, student_load_kwargs, teacher_load_kwargs
from ftune.model.vocab import added_token_ids, adds_tokens, embedding_matrices, extend_embeddings, extend_tokenizer

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
RESERVED_PADS = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>")
"""Tokens some vocabularies reserve for padding without declaring a pad token (Llama 3.1's
`<|finetune_right_pad_id|>`): used before falling back to the EOS."""
BIASES = "[.]bias$"
"""`method.train_only` of `method=bitfit` (configs/method/bitfit.yaml): the bias terms."""


def load_tokenizer(cfg: ModelCfg, key: str = "model.name_or_path"):
    """The model's tokenizer, with a pad token and the tokens of `model.add_tokens`/`add_special_tokens`.

    Tokenizers without one (Llama 3, Mistral, Mixtral) get a reserved padding token of their own vocabulary
    when it has one (`RESERVED_PADS`), else the EOS. Padding with the EOS never unlearns it: ftune's labels come
    from the rendered assistant spans and padding is masked by position (the collators' -100 after each
    row's end), never by comparing ids with the pad id, so the EOS that ends a learned turn keeps its label.
    """
    tokenizer = from_pretrained(AutoTokenizer, cfg.name_or_path, key)
    if tokenizer.pad_token is None:
        vocab = tokenizer.get_vocab()
        tokenizer.pad_token = next((token for token in RESERVED_PADS if token in vocab), tokenizer.eos_token)
    extend_tokenizer(tokenizer, cfg)
    return tokenizer


def shared_vocab_size(tokenizer) -> int:
    """Token ids the tokenizer can produce: `len(tokenizer)`, base vocabulary plus added tokens.

    Embedding matrices are often padded beyond it (Qwen2.5: 151,665 tokens in 151,936 or 152,064 rows), and
    the padding rows differ between sizes of one family, so models that share a tokenizer compare distributions
    over these first ids only.
    """
    return len(tokenizer)


def load_base_model(cfg: ModelCfg, key: str = "model.name_or_path", instrumented: bool = True,
                    **kwargs) -> PreTrainedModel:
    """The pretrained causal LM in `cfg.dtype` with the chosen attention kernel (`key` names it in errors).

    With `model.add_tokens`/`add_special_tokens`, it has a row for each, at the mean of the others (`model/vocab.py`):
    the trained model, and the frozen reference copies of it, start from the same extended base.

    `instrumented`: with ftune's changes for running it (`ftune.model.instrument`); False for a caller that
    builds more on it first (adapters) and instruments the result itself.
    """
    model = from_pretrained(
        AutoModelForCausalLM,
        cfg.name_or_path,
        key,
        dtype=DTYPES[cfg.dtype],
        attn_implementation=cfg.attn_implementation,
        **kwargs,
    )
    extend_embeddings(model, new_token_ids(cfg, key))
    if instrumented:
        instrument(model)
    return model


def new_token_ids(cfg: ModelCfg, key: str = "model.name_or_path") -> list[int]:
    """The ids of the tokens `cfg` adds, in the tokenizer the run uses (empty when it adds none)."""
    return added_token_ids(load_tokenizer(cfg, key), cfg) if adds_tokens(cfg) else []


def from_pretrained(auto_class, name_or_path: str, key: str = "model.name_or_path", **kwargs):
    """`auto_class.from_pretrained`, turning 'not found' into a one-line ResourceError naming the config `key`."""
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:  # ValueError: e.g. a directory with weights but no tokenizer
        where = "local directory" if Path(name_or_path).exists() else "hub id (offline or not cached?)"
        raise ResourceError(
            f"{key}={name_or_path}: cannot load from this {where}: {str(err).splitlines()[0]}",
            "point it at a directory with config.json, weights and tokenizer files",
        ) from err


REFERENCE_ADAPTER = "reference"
"""The name of the frozen copy of `model.adapter` that preference objectives score the reference with."""


def prepare_model(cfg: RunCfg, reference_adapter: bool = False) -> PreTrainedModel:
    """Load the base (quantized for QLoRA), make the right weights trainable for `cfg.method`, and instrument it.

    With `model.adapter`, the adapter methods start from that trained adapter (`load_start_adapter`); with
    `reference_adapter` it is also loaded a second time, frozen, as `REFERENCE_ADAPTER`. ftune's changes to the
    model (`ftune.model.instrument`, `trainer.cpu_kernels` for this machine) are listed by `model_changes`. A new
    adapter with `lora.init=loftq` or `eva` starts at PEFT's default here; `initialize_adapter` computes its init.
    """
    model = prepare_quantized(load_base_model(cfg.model, instrumented=False, **student_load_kwargs(cfg)))
    model.config.use_cache = False  # the KV cache is useless in training and wastes memory
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method.name == "full":
        freeze_matching(model, cfg.method.freeze, cfg.method.train_only)
    elif cfg.model.adapter is not None:
        model = load_start_adapter(model, cfg.model, reference_adapter)
    else:
        model = add_adapter(model, cfg.method, cfg.lora, cfg.model.gradient_checkpointing, new_token_ids(cfg.model))
    instrument(model, trains=True, kernels=kernels_on(cfg.trainer.cpu_kernels, local_device()),
               neftune_alpha=cfg.trainer.neftune_alpha)
    return model


def initialize_adapter(model: PeftModel, cfg: RunCfg, batches: Iterable[dict],
                       model_inputs: Callable[[dict], dict]) -> None:
    """The LoRA inits computed once the adapter is built: `lora.init=loftq` and `eva` (nothing for the others).

    LoftQ reads the base's stored weights; EVA runs the model on the training `batches` (`model_inputs`: a batch's
    keyword arguments for the model). Called for a new run only, after `prepare_model`: a resumed run's checkpoint
    replaces the start weights, so they are not computed again (minutes on a large model). Every process computes
    the same start from the same files or batches, and DDP's wrapping copies the main process's to all anyway.
    """
    if cfg.lora.init == "loftq":
        loftq_init(model, stored_weights(cfg.model.name_or_path))
    elif cfg.lora.init == "eva":
        eva_init(model, batches, model_inputs)


def stored_weights(name_or_path: str) -> Callable[[str], torch.Tensor]:
    """The model's tensors as its safetensors files store them (full precision), read one at a time by name.

    LoftQ needs each adapted matrix unquantized while the loaded model holds its 4-bit copy: one tensor at a time
    costs the memory of one matrix, where loading the model again unquantized would cost all of it. A hub id is
    read from the local cache, where loading the model put it.

    Raises:
        ResourceError: the model has no safetensors files (only .bin ones), or none holds the tensor asked for.
    """
    local = Path(name_or_path)
    directory = local if local.is_dir() else Path(snapshot_download(name_or_path, local_files_only=True))
    files = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as weights:
            files.update(dict.fromkeys(weights.keys(), file))  # noqa: SIM118 (safe_open is not a mapping)
    if not files:
        raise ResourceError(f"lora.init=loftq: no safetensors weights in {directory}",
                            "LoftQ reads the base's full-precision weights from its .safetensors files")

    def read(name: str) -> torch.Tensor:
        if name not in files:
            raise ResourceError(f"lora.init=loftq: no tensor {name} in the safetensors files of {directory}",
                                "LoftQ reads each adapted weight under the name the model gives it")
        with safe_open(files[name], framework="pt") as weights:
            return weights.get_tensor(name)

    return read


def load_start_adapter(model: PreTrainedModel, cfg: ModelCfg, reference_adapter: bool) -> PeftModel:
    """The base with the trained adapter `model.adapter`, trainable, and optionally a frozen second copy of it.

    Two copies of one small adapter on one base, switched with `set_adapter` (as TRL's `ref_adapter_name`), make
    the reference exactly the model training starts from, for quantized bases too, with no second base. Merging
    the adapter into the base instead would make the trained adapter one of the merged model, not of the base
    the user names, and cannot be done exactly on a 4-bit base.
    """
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # a frozen embedding would leave checkpointed blocks without gradient
    model = PeftModel.from_pretrained(model, cfg.adapter, is_trainable=True)
    if reference_adapter:
        model.load_adapter(cfg.adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
    return model


def freeze_matching(model: torch.nn.Module, patterns: list[str], train_only: tuple[str, ...] | list[str] = ()
                    ) -> None:
    """Full fine-tuning: train the parameters `train_only`'s regexes match (all when empty) but `patterns`'.

    Example: `["embed_tokens", "layers[.]0[.]"]` freezes `model.embed_tokens.weight` and all of layer 0;
    `train_only=["[.]bias$"]` (`method=bitfit`) trains the bias terms alone.

    Raises:
        ConfigError: a pattern matches no parameter (most likely a typo that would silently train it all, or,
            for BitFit, a model without bias terms).
    """
    frozen: set[str] = set()
    kept: set[str] = set()
    for name, param in model.named_parameters():
        hits = {pattern for pattern in patterns if re.search(pattern, name)}
        keeps = {pattern for pattern in train_only if re.search(pattern, name)}
        param.requires_grad_(not hits and bool(keeps or not train_only))
        frozen |= hits
        kept |= keeps
    example = next(name for name, _ in model.named_parameters())
    if unmatched := [p for p in patterns if p not in frozen]:
        raise ConfigError(f"method.freeze={unmatched}: matches no parameter name", f"names look like {example}")
    if unmatched := [p for p in train_only if p not in kept]:
        bitfit = "; method=bitfit needs a model with bias terms (Qwen2's attention has them, Llama's and Mistral's " \
                 "have none)" if BIASES in unmatched else ""
        raise ConfigError(f"method.train_only={unmatched}: matches no parameter name of the model",
                          f"names look like {example}{bitfit}")


def check_selection_before_loading(cfg: RunCfg) -> None:
    """`method.freeze` and `method.train_only` tried on the architecture's empty model (no weights, meta device).

    A pattern that matches nothing (BitFit on a model without biases) then fails before the weights load, and so
    does a selection that leaves the rows of added tokens (`model.add_tokens`) frozen at their starting mean.
    """
    method = cfg.method
    if method.name != "full" or not (method.freeze or method.train_only):
        return
    config = from_pretrained(AutoConfig, cfg.model.name_or_path)
    with torch.device("meta"):
        empty = AutoModelForCausalLM.from_config(config)
    freeze_matching(empty, method.freeze, method.train_only)
    if adds_tokens(cfg.model) and not all(weight.requires_grad for weight in embedding_matrices(empty)):
        raise ConfigError(f"model.add_tokens/add_special_tokens with method.freeze={method.freeze} and "
                          f"method.train_only={method.train_only}: the input embedding or the output head stays "
                          "frozen (expected both to train: the new tokens' rows start at the mean)")


def load_teacher(cfg: RunCfg) -> PreTrainedModel | None:
    """The distillation teacher, frozen and in eval mode on this process's device; None without `distill.teacher`.

    The vocabularies are compared first, from tokenizers and configs only, so a wrong teacher fails before
    any of its weights load. The teacher runs in `model.dtype` with the student's attention kernel (packed
    batches' masks suit both), quantized when `distill.teacher_bits` is set.

    Raises:
        ConfigError: the teacher's vocabulary differs from the student's.
        ResourceError: the teacher cannot be loaded.
    """
    if cfg.distill.teacher is None:
        return None
    check_same_vocabulary(cfg.model.name_or_path, cfg.distill.teacher)
    teacher_cfg = dataclasses.replace(cfg.model, name_or_path=cfg.distill.teacher)
    return load_frozen(teacher_cfg, "distill.teacher", **teacher_load_kwargs(cfg))


def load_frozen(cfg: ModelCfg, key: str, **kwargs) -> PreTrainedModel:
    """A model that only runs forward (a teacher, a reference): no gradients, eval mode, on this process's device."""
    placement = {"device_map": {"": PartialState().device}}
    model = load_base_model(cfg, key, **(placement | kwargs))
    model.requires_grad_(False)
    return model.eval()


def check_same_vocabulary(student: str, teacher: str) -> None:
    """Distillation compares distributions token by token, so both models need one tokenizer.

    Their embedding matrices may be padded differently (Qwen2.5-7B: 152,064 rows, 0.5B: 151,936, for the same
    151,665 tokens): distributions are compared over the shared tokenizer vocabulary (`shared_vocab_size`), so
    only rows the tokenizer cannot reach may differ.

    Raises:
        ConfigError: the tokenizers' vocabularies or special tokens differ, or a model has fewer embedding rows
            than the tokenizer has tokens.
    """
    student_tok = load_tokenizer(ModelCfg(name_or_path=student))
    teacher_tok = load_tokenizer(ModelCfg(name_or_path=teacher), "distill.teacher")
    student_size = from_pretrained(AutoConfig, student).get_text_config().vocab_size
    teacher_size = from_pretrained(AutoConfig, teacher, "distill.teacher").get_text_config().vocab_size
    if problems := vocabulary_differences(student_tok, teacher_tok, student_size, teacher_size):
        raise ConfigError(
            f"distill.teacher={teacher} and model.name_or_path={student} do not share a vocabulary: "
            + "; ".join(problems),
            "distillation needs a teacher with the student's tokenizer",
        )


def vocabulary_differences(student_tok, teacher_tok, student_size: int, teacher_size: int) -> list[str]:
    """What differs between the two vocabularies (empty when they are the same; padding rows may differ)."""
    problems = []
    for role, size in (("student", student_size), ("teacher", teacher_size)):
        if size < shared_vocab_size(student_tok):
            problems.append(f"the {role} has {size} embedding rows for {shared_vocab_size(student_tok)} tokens")
    student_vocab, teacher_vocab = student_tok.get_vocab(), teacher_tok.get_vocab()
    if student_vocab != teacher_vocab:
        differing = set(student_vocab.items()) ^ set(teacher_vocab.items())
        problems.append(f"{len({token for token, _ in differing})} tokens differ or have different ids")
    for name in SPECIAL_TOKENS:
        ours, theirs = getattr(student_tok, name), getattr(teacher_tok, name)
        if ours != theirs:
            problems.append(f"{name} {ours!r} (student) vs {theirs!r} (teacher)")
    return problems


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts, 4-bit weights counted unpacked (two per stored byte)."""
    if isinstance(model, PeftModel):  # PEFT knows how bitsandbytes packs quantized weights
        trainable, total = model.get_nb_trainable_parameters()
        return total, trainable
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
