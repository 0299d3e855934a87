"""Typed options of the commands that take no recipe: `ftune merge`, `ftune eval` and `ftune export`.

`load_command_config` parses `key=value` arguments into these dataclasses (an unknown key or a badly typed
value is a one-line error) and checks each field's `choices`/`min`/`max`; the rules that relate several
fields are the pure `*_problems` functions below, which, like `config.validate`, report every problem at once
and import nothing of torch.
"""

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from ftune.config.schema import DataCfg, ProbeCfg, TrainerCfg, bounded, choice
from ftune.errors import ConfigError

RUN_CONFIG_FILE = "config.yaml"
"""The resolved config a training run writes into its directory (what `ftune eval run=` reads)."""

COMBINATIONS_NEEDING_DENSITY = ("ties", "dare_ties")
"""Combinations that prune each adapter to `density` before combining (PEFT's `add_weighted_adapter`)."""


@dataclass
class MergeCfg:
    """`ftune merge`: fold one adapter, or a weighted combination of several, into a standalone model."""

    adapter: str | None = None
    """A PEFT adapter directory (with adapter_config.json), e.g. `<run>/final`."""
    adapters: list[str] = field(default_factory=list)
    """Several LoRA adapters trained on the same base, combined into one (instead of `adapter`)."""
    weights: list[float] = field(default_factory=list)
    """One weight per entry of `adapters`; empty gives each the same weight 1 / len(adapters)."""
    combination: str = choice("linear", "ties", "dare_ties")
    """How `adapters` are combined: a weighted sum, TIES (trim, elect sign, disjoint mean) or DARE-TIES."""
    density: float = bounded(0.5, 0.0, 1.0)
    """ties / dare_ties: the fraction of each adapter's entries kept before the sign election."""
    merge: bool = True
    """Fold the (combined) adapter into the base and save a model; false saves the combined adapter only."""
    base: str | None = None
    """Base model (hub id or directory); null reads `base_model_name_or_path` from adapter_config.json."""
    dtype: str = choice("fp32", "bf16", "fp16")
    """Precision the base is loaded, merged and saved in (never a quantized base, even for QLoRA adapters)."""
    out: str | None = None
    """Directory to write; it must not exist, be empty, or be replaced with overwrite=true."""
    overwrite: bool = False
    """Replace an existing non-empty `out`."""
    max_shard_size: str = "5GB"
    """Largest safetensors file written; larger models are sharded with an index."""
    seed: int = 42
    """Seeds DARE's random pruning, so a combination is reproducible."""


@dataclass
class EvalCfg:
    """`ftune eval`: compare models on held-out data, the probe, lm-eval benchmarks and generations.

    Data and probe take training's keys (`data.eval_path`, `data.packing`, `probe.path`, ...).
    """

    model: str | None = None
    """The model to evaluate: a hub id or directory, an adapter directory, or a merged model."""
    models: list[str] = field(default_factory=list)
    """More models, evaluated side by side with `model` (the first one's base is always a reference row)."""
    run: str | None = None
    """A training run directory: its config.yaml supplies `data`, `probe`, `batch_size`, `mixed_precision` and the
    loss as trained (keys given here still win), and `model` defaults to its final/."""
    data: DataCfg = field(default_factory=DataCfg)
    """Held-out data as training reads it: `data.eval_path` (null skips loss and generations), `data.format`,
    `data.chat_template`, `data.max_length`, `data.packing`; `data.path` is not read."""
    probe: ProbeCfg = field(default_factory=ProbeCfg)
    """The forgetting probe as in training: `probe.path` (null skips it), `probe.max_length`, `probe.tasks`."""
    tasks: list[str] = field(default_factory=list)
    """lm-eval tasks scored for every model, e.g. `[tinyworld_tense]` (shipped, offline) or `[hellaswag,mmlu]`
    (their datasets cached or a network); `probe.tasks` are scored too."""
    limit: int | None = None
    """Examples per lm-eval task (null: all; lm-eval's `limit`); `probe.limit` when null and probe tasks are set."""
    task_dir: str | None = None
    """A directory of your own lm-eval task YAML, searched before lm-eval's registry."""
    batch_size: int = bounded(8, 1)
    """Examples per forward pass."""
    dtype: str = choice("fp32", "bf16", "fp16")
    """Precision every model is loaded in (adapters' bases in full precision, as `ftune merge` loads them)."""
    mixed_precision: str = choice("no", "bf16", "fp16")
    """Autocast the forward passes as training does with `trainer.mixed_precision`."""
    generate: int = bounded(32, -1)
    """Held-out conversations whose last assistant turn is generated and scored; 0 skips, -1 takes all."""
    max_new_tokens: int = bounded(64, 1)
    """Longest generated answer, in tokens."""
    show: int = bounded(3, 0)
    """Generations printed side by side after the table (all are written to generations.jsonl)."""
    out: str | None = None
    """Write the results as JSON here (`{model_name: {eval_loss, eval_ppl, probe_ppl, ...}}`), and every
    generation to generations.jsonl next to it."""


@dataclass
class ExportCfg:
    """`ftune export`: write a trained model in a serving format, read it back with its runtime, compare."""

    run: str | None = None
    """A run directory; its `final/` (an adapter or a full model) is exported and its records fill the model card."""
    adapter: str | None = None
    """A PEFT adapter directory (with adapter_config.json), instead of `run`."""
    model: str | None = None
    """A standalone model directory (a merged or fully fine-tuned model), instead of `run`."""
    format: str = choice("hf", "gguf", "adapter")
    """hf: a merged standalone model; gguf: one llama.cpp file; adapter: the PEFT adapter alone."""
    quant: str = choice("f16", "bf16", "q8_0")
    """format=gguf: the weights' encoding (norms stay f32); each has its own parity tolerance."""
    base: str | None = None
    """Base model of an adapter (hub id or directory); null reads `base_model_name_or_path` from adapter_config.json."""
    dtype: str = choice("fp32", "bf16", "fp16")
    """format=hf: precision the merged model is saved in (the base is always merged in full precision)."""
    out: str | None = None
    """Directory to write (the export, `export_report.json`, `README.md`); it must not exist or be empty."""
    overwrite: bool = False
    """Replace an existing non-empty `out`."""
    max_shard_size: str = "5GB"
    """format=hf: largest safetensors file written; larger models are sharded with an index."""
    push: bool = False
    """Upload `out` to the Hugging Face Hub as `repo_id` once parity passed."""
    repo_id: str | None = None
    """push=true: the Hub repository to create or update, `user/name`."""
    private: bool = True
    """push=true: create the repository private (an existing repository keeps its visibility)."""


def merge_problems(cfg: MergeCfg) -> list[str]:
    """Every problem with how `cfg`'s fields fit together, each naming its key; empty when valid."""
    problems = []
    if (cfg.adapter is None) == (not cfg.adapters):
        problems.append("adapter / adapters: give exactly one (adapter=DIR, or adapters=[DIR,DIR,...])")
    if cfg.adapters and len(cfg.adapters) < 2:
        problems.append(f"adapters={cfg.adapters} (expected two or more directories; use adapter=DIR for one)")
    if cfg.weights and len(cfg.weights) != len(cfg.adapters):
        problems.append(f"weights={cfg.weights} (expected one weight per adapter: {len(cfg.adapters)})")
    if cfg.combination in COMBINATIONS_NEEDING_DENSITY and cfg.density == 0.0:
        problems.append(f"density=0 with combination={cfg.combination} (expected > 0: 0 prunes every entry)")
    if cfg.adapter is not None and not cfg.merge:
        problems.append("merge=false with a single adapter (expected adapters=[...]: one adapter is already saved)")
    if cfg.out is None:
        problems.append("out: missing (expected the directory to write, out=DIR)")
    return problems


def eval_problems(cfg: EvalCfg) -> list[str]:
    """Every problem with how `cfg`'s fields fit together, each naming its key; empty when valid."""
    problems = []
    if cfg.model is None and not cfg.models and cfg.run is None:
        problems.append("model: missing (expected model=PATH_OR_ID, models=[A,B,...] or run=DIR)")
    if cfg.data.eval_path is None and cfg.probe.path is None and not cfg.tasks and not cfg.probe.tasks:
        problems.append("data.eval_path=null, probe.path=null and no tasks (expected at least one: there is "
                        "nothing to measure)")
    if cfg.limit is not None and cfg.limit < 1:
        problems.append(f"limit={cfg.limit} (expected a positive number of examples per task, or null for all)")
    return problems


def export_problems(cfg: ExportCfg) -> list[str]:
    """Every problem with how `cfg`'s fields fit together, each naming its key; empty when valid."""
    problems = []
    sources = [key for key in ("run", "adapter", "model") if getattr(cfg, key) is not None]
    if len(sources) != 1:
        problems.append(f"run / adapter / model: give exactly one (got {', '.join(sources) or 'none'}; expected "
                        "run=DIR, adapter=DIR or model=DIR)")
    if cfg.format == "adapter" and cfg.model is not None:
        problems.append("format=adapter with model= (expected run= or adapter=: a standalone model has no adapter)")
    if cfg.quant != "f16" and cfg.format != "gguf":
        problems.append(f"quant={cfg.quant} with format={cfg.format} (expected format=gguf: quant is its encoding)")
    if cfg.base is not None and cfg.model is not None:
        problems.append("base= with model= (expected run= or adapter=: a standalone model has no base to merge into)")
    if cfg.out is None:
        problems.append("out: missing (expected the directory to write, out=DIR)")
    if cfg.push and not cfg.repo_id:
        problems.append("push=true without repo_id (expected repo_id=USER/NAME)")
    return problems


def with_run_settings(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """`ftune eval run=DIR`: the run's data, probe, batch size and precision, under the keys given on the command line.

    A key given explicitly (`data.packing=false`, or a whole section, `data=...`) keeps its value; everything
    else of `data` and `probe` is the run's, so the held-out set, template, sequence length and probe are the
    ones it trained with. `model` defaults to the run's final/, which `models` are then compared with.

    Raises:
        ConfigError: `run` has no config.yaml.
    """
    if cfg.run is None:
        return cfg
    path = Path(cfg.run) / RUN_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"run={cfg.run}: no {RUN_CONFIG_FILE} in it", "expected a directory written by ftune train")
    trained = OmegaConf.load(path)
    settings = {"data": OmegaConf.to_container(trained.data), "probe": OmegaConf.to_container(trained.probe),
                "batch_size": trained.trainer.micro_batch_size, "mixed_precision": trained.trainer.mixed_precision}
    if cfg.model is None:
        settings["model"] = str(Path(cfg.run) / "final")
    for key in given_keys(overrides):
        drop_key(settings, key)
    return OmegaConf.merge(cfg, settings)


def run_trainer_cfg(run_dir: str) -> TrainerCfg:
    """The trainer settings a run trained with (its loss chunking and precision), from its config.yaml."""
    trained = OmegaConf.load(Path(run_dir) / RUN_CONFIG_FILE)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainerCfg), trained.trainer))


def given_keys(overrides: list[str]) -> list[str]:
    """The dotted keys a command line sets (`data.packing=true` -> `data.packing`)."""
    return [item.partition("=")[0].lstrip("+~") for item in overrides]


def drop_key(settings: dict, key: str) -> None:
    """Remove dotted `key` from nested `settings`, if there."""
    *parents, leaf = key.split(".")
    for parent in parents:
        settings = settings.get(parent)
        if not isinstance(settings, dict):
            return
    settings.pop(leaf, None)
