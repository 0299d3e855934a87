"""PEFT adapters from ftune's config: LoRA (its variants), AdaLoRA, VeRA, LoHa, LoKr, IA3, prompt and prefix tuning.

Each method maps to one PEFT config builder in `PEFT_CONFIGS`; PEFT does the rest, so an adapter saved here
loads with `PeftModel.from_pretrained` alone.
"""

import warnings
from collections.abc import Callable, Iterable, Sequence

import torch
from peft import (
    AdaLoraConfig,
    EvaConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    VeraConfig,
    get_peft_model,
    initialize_lora_eva_weights,
)
from peft.tuners.lora import LoraLayer, ParamWrapper
from peft.utils.constants import EMBEDDING_LAYER_NAMES

from ftune.compat import convolution_base
from ftune.config.architecture import expert_count
from ftune.config.schema import LoraCfg, MethodCfg

TASK_TYPE = "CAUSAL_LM"
ALL_LINEAR = "all-linear"
"""PEFT's own preset: every linear layer but the output head."""
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
}
"""Names in `lora.target_modules` that stand for several modules (Llama-style projection names)."""
LORA_INIT: dict[str, bool | str] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora",
                                    "loftq": True, "eva": "eva"}
"""`lora.init` -> PEFT's `init_lora_weights` (True: Kaiming-uniform A and zero B).

`loftq` and `eva` are computed once the adapter exists (`loftq_init`, `eva_init`). LoftQ starts from PEFT's
default: PEFT's own `"loftq"` needs the whole model unquantized in memory and rewrites its weights."""
EVA_RHO = 1.0
"""EVA's rank redistribution, off: every layer keeps rank `lora.r`. With rho > 1 the ranks would depend on the
data, so `ftune plan` could not count the parameters before the data is read, and a resumed run would have to
rebuild the saved shapes (`rank_pattern`) before loading its checkpoint."""
EXPERT_DIMS = 3
"""Fused MoE expert weights are (experts, out_features, in_features)."""
MERGEABLE = frozenset({"lora", "adalora", "vera", "loha", "lokr", "ia3"})
"""Methods whose adapters fold into the base weights; prompt and prefix tuning add inputs, not weight deltas."""


def can_merge(method_name: str) -> bool:
    """Whether adapters of `method_name` can be merged into the base weights.

    Args:
        method_name: ftune's `method.name`; a saved adapter's `PeftConfig.peft_type.value.lower()` is the same
            name (`lora`, `ia3`, `prompt_tuning`, `prefix_tuning`).

    Returns:
        True for LoRA (all its variants), AdaLoRA, VeRA, LoHa, LoKr and IA3; False for prompt and prefix tuning, and for
        full fine-tuning, which has no adapter to merge.
    """
    return method_name in MERGEABLE


def prepends_virtual_tokens(model: torch.nn.Module) -> bool:
    """Whether one of the model's adapters is PEFT prompt learning (prompt or prefix tuning).

    Its forward reads virtual tokens before the input ids, so the ids alone are not what the model sees.
    """
    return any(adapter.is_prompt_learning for adapter in getattr(model, "peft_config", {}).values())


def resolve_targets(names: list[str]) -> str | list[str]:
    """`lora.target_modules` as PEFT takes it: `all-linear` alone stays PEFT's preset, other presets expand.

    Example: `["attention", "gate_proj"]` -> `["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]`.
    """
    if names == [ALL_LINEAR]:
        return ALL_LINEAR
    expanded = [module for name in names for module in TARGET_PRESETS.get(name, (name,))]
    return list(dict.fromkeys(expanded))  # drop repeats, keep the order


def expert_parameters(model) -> list[str]:
    """Suffixes (`mlp.experts.gate_up_proj`) of the fused 3-D expert weights of a mixture-of-experts model.

    transformers 5 stores each MoE layer's experts as one (experts, out, in) nn.Parameter, not as nn.Linear
    modules, so PEFT's `all-linear` preset never sees them (peft#3009); PEFT reaches them through
    `target_parameters`. The router is a 2-D weight and the head a Linear PEFT excludes: neither is listed. A 3-D
    weight is an expert stack only when the config routes to experts and its first dimension counts them: a
    convolution's kernel (the causal conv1d of Mamba layers, (channels, 1, width)) is not one, and a LoRA made
    for a matrix would merge into it wrongly.

    Returns:
        Sorted suffixes of the last two module names and the parameter name; empty for dense models.
    """
    experts = routed_experts(model)
    found = set()
    for module_name, module in model.named_modules():
        if isinstance(module, convolution_base()) or "lora_" in module_name:
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if experts > 1 and param.dim() == EXPERT_DIMS and param.shape[0] == experts:
                found.add(".".join([*module_name.split(".")[-2:], param_name]))
    return sorted(found)


def routed_experts(model) -> int:
    """The number of routed experts `model`'s config (its decoder's, for a multimodal one) declares; 0 if dense."""
    config = model.config.to_dict()
    return expert_count(config.get("text_config") or config)


def embeddings_tied(model) -> bool:
    """Whether the output head's weight is the input embedding's own Parameter, as transformers ties them."""
    head = model.get_output_embeddings()
    return head is not None and head.weight is model.get_input_embeddings().weight


def names_an_embedding(cfg: LoraCfg) -> bool:
    """Whether `modules_to_save` or `target_modules` name the embedding or the head, as PEFT recognises them.

    Only then has PEFT's `ensure_weight_tying` something to keep tied; asked for without one, PEFT warns on the
    user's terminal (a `UserWarning` before `ftune plan`'s table).
    """
    return any(name.split(".")[-1] in EMBEDDING_LAYER_NAMES for name in [*cfg.modules_to_save, *cfg.target_modules])


def drop_linear_inputs(model, p: float) -> None:
    """LoRA dropout `p` on every adapted linear layer of a PeftModel built without it.

    A parameter targeted through `target_parameters` (fused MoE experts) is multiplied inside its module's own
    forward, where no input can be dropped before lora_A: PEFT's `ParamWrapper` refuses dropout, and keeps none.
    The saved adapter_config.json then records `lora_dropout: 0.0`; dropout only changes training.
    """
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and not isinstance(layer, ParamWrapper):
            for adapter in layer.lora_dropout:
                layer.lora_dropout[adapter] = torch.nn.Dropout(p)


def linear_module_names(model) -> list[str]:
    """Leaf names of the model's nn.Linear modules but the output head and the routers: what `all-linear` adapts.

    A router scores the experts; a LoRA on it would change which experts each token reaches. It is the Linear with
    one output per routed expert, or one under a module named `router` or named `gate` (Mixtral's): LongCat-Flash's
    `router.classifier` also scores its "zero" experts, and reads its weight directly (`F.linear`), so a LoRA there
    is ignored in training yet merged (0.14 of the largest logit apart on a tiny copy).
    """
    head = model.get_output_embeddings()
    experts = routed_experts(model)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and module is not head
                   and not (experts > 1 and is_router(name, module, experts))})


def is_router(name: str, module: torch.nn.Linear, experts: int) -> bool:
    """Whether the Linear `name` of a mixture-of-experts model scores its `experts` (see `linear_module_names`)."""
    parts = name.split(".")
    return module.out_features == experts or "router" in parts or parts[-1] == "gate"


def lora_config(method: MethodCfg, cfg: LoraCfg, model=None) -> LoraConfig:
    """PEFT's LoraConfig: targets, rank-stabilised scaling (rsLoRA), DoRA, fully trained modules, init.

    With `all-linear` on a mixture-of-experts `model`, the fused expert weights are targeted too (see
    `expert_parameters`), and the linear layers are listed by name instead of PEFT's preset: for Mixtral and
    Qwen2-MoE, PEFT 0.21 turns `all-linear` into transformers-4 names that include the router (`gate.weight`,
    an nn.Linear in transformers 4), and a LoRA on the router would change which experts each token reaches.
    PEFT refuses `lora_dropout` on target_parameters, so such a config has none: `add_adapter` gives the linear
    layers theirs (`drop_linear_inputs`). On a model with tied embeddings, PEFT keeps the head tied to a trained
    embedding (`ensure_weight_tying`).
    """
    experts = expert_parameters(model) if model is not None and cfg.target_modules == [ALL_LINEAR] else []
    return LoraConfig(
        task_type=TASK_TYPE,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0 if experts else cfg.dropout,
        target_modules=linear_module_names(model) if experts else resolve_targets(cfg.target_modules),
        use_rslora=cfg.rslora,
        use_dora=cfg.dora,
        modules_to_save=list(cfg.modules_to_save) or None,
        init_lora_weights=LORA_INIT[cfg.init],
        target_parameters=experts or None,
        eva_config=EvaConfig(rho=EVA_RHO) if cfg.init == "eva" else None,
        # A tied model with `embed_tokens` in modules_to_save would otherwise train a copy of the embedding that
        # the head does not use; the merged model, re-tied on loading, then answers differently (tested).
        ensure_weight_tying=model is not None and embeddings_tied(model) and names_an_embedding(cfg),
    )


def adalora_config(method: MethodCfg, cfg: LoraCfg, model=None) -> AdaLoraConfig:
    """AdaLoRA: LoRA in SVD form (P diag(E) Q) whose least important singular values are cut as it trains.

    Each matrix starts at rank `lora.r`, and `method.adalora.target_r` per matrix remain on average (Zhang et al.,
    2023).
    The allocation needs the run's number of optimizer steps, which is known only once the data are prepared:
    PEFT's config gets a one-step placeholder here, and `ftune.train.method_steps.AdaloraAllocation` sets the real
    schedule before the first step. `lora.alpha` scales as in LoRA (alpha / the current rank).
    """
    return AdaLoraConfig(task_type=TASK_TYPE, init_r=cfg.r, target_r=method.adalora.target_r, lora_alpha=cfg.alpha,
                         lora_dropout=cfg.dropout, target_modules=resolve_targets(cfg.target_modules),
                         beta1=method.adalora.beta1, beta2=method.adalora.beta2, deltaT=method.adalora.every,
                         orth_reg_weight=method.adalora.orth_reg_weight, total_step=1,
                         modules_to_save=list(cfg.modules_to_save) or None)


def vera_config(method: MethodCfg, cfg: LoraCfg, model=None) -> VeraConfig:
    """VeRA: frozen random projections shared by every adapted layer, and two trained scaling vectors per layer.

    The projections have rank `lora.r` (256 in the paper and in `method=vera`) and are saved with the adapter, so
    it loads alone; far fewer weights train than LoRA's. `lora.dropout` is its dropout on the layer input.
    """
    return VeraConfig(task_type=TASK_TYPE, r=cfg.r, target_modules=resolve_targets(cfg.target_modules),
                      vera_dropout=cfg.dropout, save_projection=True)


def loha_config(method: MethodCfg, cfg: LoraCfg, model=None) -> LoHaConfig:
    """LoHa: the update is the Hadamard product of two rank-`lora.r` products, scaled by alpha / r (LyCORIS).

    `lora.dropout` is LyCORIS's rank dropout (whole rank components dropped), the dropout it has in place of LoRA's.
    """
    return LoHaConfig(task_type=TASK_TYPE, r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.dropout,
                      target_modules=resolve_targets(cfg.target_modules))


def lokr_config(method: MethodCfg, cfg: LoraCfg, model=None) -> LoKrConfig:
    """LoKr: the update is a Kronecker product of a small matrix and a rank-`lora.r` one, scaled by alpha / r.

    `lora.dropout` is LyCORIS's rank dropout, as for LoHa.
    """
    return LoKrConfig(task_type=TASK_TYPE, r=cfg.r, alpha=cfg.alpha, rank_dropout=cfg.dropout,
                      target_modules=resolve_targets(cfg.target_modules))


def ia3_config(method: MethodCfg, cfg: LoraCfg, model=None) -> IA3Config:
    """PEFT's IA3Config with its per-architecture default targets (Llama: k, v and down projections)."""
    return IA3Config(task_type=TASK_TYPE)


def prompt_tuning_config(method: MethodCfg, cfg: LoraCfg, model=None) -> PromptTuningConfig:
    """Learned virtual-token embeddings prepended to the input.

    They start as embeddings of randomly drawn vocabulary tokens: PEFT's `RANDOM` init draws from N(0, 1),
    an order of magnitude larger than a trained model's embeddings, which the model then barely learns from.
    """
    return PromptTuningConfig(task_type=TASK_TYPE, num_virtual_tokens=method.num_virtual_tokens,
                              prompt_tuning_init="SAMPLE_VOCAB")


def prefix_tuning_config(method: MethodCfg, cfg: LoraCfg, model=None) -> PrefixTuningConfig:
    """Learned keys and values of virtual tokens prepended in every attention layer."""
    return PrefixTuningConfig(task_type=TASK_TYPE, num_virtual_tokens=method.num_virtual_tokens)


PEFT_CONFIGS: dict[str, Callable[..., PeftConfig]] = {
    "lora": lora_config,
    "adalora": adalora_config,
    "vera": vera_config,
    "loha": loha_config,
    "lokr": lokr_config,
    "ia3": ia3_config,
    "prompt_tuning": prompt_tuning_config,
    "prefix_tuning": prefix_tuning_config,
}
"""`method.name` -> builder of its PEFT config; `full` is not here: it trains the model itself."""


def peft_config(method: MethodCfg, lora: LoraCfg, model=None) -> PeftConfig:
    """The PEFT config of `method.name` (one of `PEFT_CONFIGS`) for `model` (its MoE experts, if any)."""
    return PEFT_CONFIGS[method.name](method, lora, model)


def add_adapter(model, method: MethodCfg, lora: LoraCfg, gradient_checkpointing: bool,
                new_token_ids: Sequence[int] = ()):
    """Wrap `model` in a PeftModel that trains only the adapter, `modules_to_save` and the added tokens' rows.

    Args:
        model: the loaded (possibly quantized) base model.
        method: which PEFT method, and its number of virtual tokens.
        lora: LoRA settings (read for `method.name=lora` only).
        gradient_checkpointing: whether the base recomputes activations in the backward pass.
        new_token_ids: the ids of tokens the run added (`model.add_tokens`), whose rows train beside a LoRA adapter
            (`new_token_rows`; validation allows added tokens with LoRA only).

    Returns:
        The PeftModel, as PEFT builds it (`ftune.model.instrument` then applies ftune's CPU kernels). On a
        mixture-of-experts model the fused experts have no dropout (see `drop_linear_inputs`; the run prints a
        note saying so).
    """
    if gradient_checkpointing:
        # With a frozen embedding no input requires grad, and checkpointed blocks would get no gradient.
        model.enable_input_require_grads()
    config = peft_config(method, lora, model)
    if new_token_ids:
        config.trainable_token_indices = new_token_rows(model, list(new_token_ids), lora.modules_to_save)
    with warnings.catch_warnings():
        # PEFT advises `low_cpu_mem_usage` for EVA: adapter weights created on the meta device. A resumed run
        # loads its checkpoint into them without computing EVA, which needs them real; they are small anyway.
        warnings.filterwarnings("ignore", "lora with eva initialization used with low_cpu_mem_usage=False")
        model = get_peft_model(model, config)
    if getattr(config, "target_parameters", None) and lora.dropout:
        drop_linear_inputs(model, lora.dropout)
    return model


def new_token_rows(model, ids: list[int], modules_to_save: list[str]) -> dict[str, list[int]] | None:
    """PEFT's `trainable_token_indices` for added tokens: their rows of the input embedding and of an untied head.

    Only those rows train: PEFT keeps them as the trainable weight and writes them over the frozen matrix in each
    forward, and saves them with the adapter (`merge_and_unload` writes them into the matrix). A tied head follows
    the embedding's rows (PEFT ties it). A matrix named in `lora.modules_to_save` trains in full already, its new
    rows with it, and PEFT refuses both on one layer.

    Example: a tied Llama, ids [1574, 1575] -> {"model.embed_tokens": [1574, 1575]}; untied, "lm_head" too.
    """
    layers = [model.get_input_embeddings(), *([] if embeddings_tied(model) else [model.get_output_embeddings()])]
    names = [name for name, module in model.named_modules() if any(module is layer for layer in layers)]
    rows = {name: ids for name in names if name.split(".")[-1] not in modules_to_save}
    return rows or None


@torch.no_grad()
def loftq_init(model, stored_weight: Callable[[str], torch.Tensor]) -> None:
    """LoftQ (Li et al., 2023): each 4-bit layer's LoRA starts at the best rank-r correction of its quantization error.

    With W the stored weight and Q its 4-bit copy in `model`, scaling * B A is the rank-r truncated SVD of W - Q,
    so Q + scaling * B A is as close to W as rank r allows. This is one LoftQ iteration, as PEFT's
    `replace_lora_weights_loftq`: the 4-bit base stays the one loaded, so the adapter belongs to the base anyone
    loads from `model.name_or_path` with the same quantization (merged into the unquantized base instead, its
    start adds the correction to weights that had no error). Cost: each adapted weight is read from the model's files
    (`stored_weight`, by parameter name) and decomposed by a full SVD on its layer's device, one at a time, so the
    memory of one float32 matrix and its factors, and the time of one SVD per adapted matrix: a GPU's job for
    large models (one 4096 x 4096 SVD took minutes on 2 CPU cores); the embedded model's take seconds.

    Written here, not by calling `replace_lora_weights_loftq` (PEFT 0.21): that one computes on "cuda" (or XPU)
    whatever the model's device, so it fails on a CPU, and it ignores the LoRA scaling: its B A is the error's
    approximation itself, which the forward multiplies by alpha / r. At ftune's alpha = 2r the layer then
    overshoots by as much as it corrects (Q + 2P is exactly as far from W as Q, P being an orthogonal projection
    of W - Q).

    Args:
        model: a PeftModel with new LoRA adapters on a 4-bit base (`quant.bits=4`).
        stored_weight: the base's full-precision weight of a parameter name (`model.load.stored_weights`).
    """
    from bitsandbytes.functional import dequantize_4bit
    from bitsandbytes.nn import Linear4bit

    for name, layer in model.get_base_model().named_modules():
        base = layer.get_base_layer() if isinstance(layer, LoraLayer) else None
        if not isinstance(base, Linear4bit):
            continue
        weight = stored_weight(f"{name}.weight").to(base.weight.device, torch.float32)
        error = weight - dequantize_4bit(base.weight.data, base.weight.quant_state).float()
        for adapter in layer.lora_A:
            lora_a, lora_b = low_rank_factors(error, layer.r[adapter], layer.scaling[adapter])
            layer.lora_A[adapter].weight.copy_(lora_a)
            layer.lora_B[adapter].weight.copy_(lora_b)


def low_rank_factors(matrix: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with scaling * B A the rank-`rank` truncated SVD of `matrix`, the singular values split evenly."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root


def eva_init(model, batches: Iterable[dict], model_inputs: Callable[[dict], dict]) -> None:
    """EVA (Paischer et al., 2024): each A starts at the top principal directions of its layer's inputs; B at zero.

    PEFT's `initialize_lora_eva_weights` runs the base (adapters off, no gradient) on `batches` and fits an
    incremental SVD to each adapted layer's inputs at the learned tokens' positions, going through the batches
    again until the directions settle (cosine similarity 0.99 between consecutive batches, PEFT's `tau`). Layers
    that share an input (q, k and v) share one SVD. Cost: those forwards, each followed by a small SVD per distinct
    layer input (tokens x hidden size), and the batches seen, which PEFT keeps for its next pass; about 20 batches
    of the shipped data on the embedded model. The rank of every layer stays `lora.r` (`EVA_RHO`).

    Every process computes it alone (no activations exchanged): `batches` is the training loader before
    accelerate splits it, seeded, so each process reads the same batches and computes the same directions, and
    DDP's wrapping starts every process from the main process's weights anyway.

    Args:
        model: a PeftModel with a new LoRA adapter built with `lora.init=eva`.
        batches: the training batches (a loader with a length: PEFT goes through it in cycles).
        model_inputs: a batch's keyword arguments for the model (`ftune.eval.loss.model_inputs`; model/ does not
            import eval/).
    """
    initialize_lora_eva_weights(model, batches, forward_fn=lambda peft_model, batch: peft_model(**model_inputs(batch)),
                                prepare_model_inputs_fn=learned_positions, gather_distributed_inputs=False)


def learned_positions(batch: dict, config: LoraConfig) -> torch.Tensor:
    """(row, position) of each learned token of `batch`: the inputs EVA's SVD reads (PEFT's label mask).

    PEFT's own selection also reads a 2D attention mask; ftune's packed batches have a 4D one or none, and the
    padding is never learned anyway.
    """
    return (batch["labels"] != config.eva_config.label_mask_value).nonzero()
