"""The seam between the training loop and what a run learns from (`objective=`), whatever `method` trains.

An objective owns its batch shape (the loaders it builds), its loss, the count the optimizer step divides that
loss by, the metrics it logs, its evaluation and (in `config/validate.py`'s `HELD_OUT_METRICS`) its default
early-stopping metric. The loop only calls the methods below; docs/design.md says how to add an objective.
"""

import torch
from accelerate import Accelerator
from accelerate.utils import reduce

from ftune.config.schema import RunCfg
from ftune.eval.loss import learned_token_count
from ftune.model.dropout import eval_mode
from ftune.model.instrument import Change
from ftune.train.head import HEAD_CAPTURE
from ftune.train.losses import StepLoss


class Objective:
    """What the run learns from. Subclasses set `count_name` and implement the methods that raise here."""

    count_name = "learned_tokens"
    """What `count` counts (what the step's sums are divided by): `learned_tokens`, `pairs`, `completions`."""
    needs_reference_adapter = False
    """Whether a start adapter (`model.adapter`) is also loaded frozen, as the reference, by `prepare_model`."""
    samples_itself = False
    """Whether the objective writes generations.jsonl itself (`trainer.sample_every`): online objectives log what
    they sampled and were rewarded for, instead of greedy answers to held-out conversations."""

    def __init__(self, cfg: RunCfg):
        self.cfg = cfg
        self.token_loss: StepLoss | None = None
        """The plain cross-entropy, chunked like the run's loss: what the forgetting probe measures."""

    def build_loaders(self, tokenizer, accelerator: Accelerator) -> tuple[dict, dict]:
        """The `train` and `eval` loaders (eval None without `data.eval_path`) and their statistics."""
        raise NotImplementedError

    def load_frozen(self) -> None:
        """Load the frozen models of the objective's own (a teacher, a reference copy) before the trained one loads.

        First, so that a wrong one fails before the larger load.
        """

    def attach(self, model, tokenizer) -> None:
        """Bind to the prepared model (unwrapped): its head for the chunked loss, and any frozen model it needs."""
        raise NotImplementedError

    def start(self, model, accelerator) -> None:
        """Work done once with the weights training starts from (`model` wrapped), before a checkpoint's replace them.

        A precomputed reference, for instance. Nothing by default.
        """

    def prepare_step(self, model, batches: list[dict], step: int) -> list[dict]:
        """The step's micro-batches as `loss` takes them, before the step's first gradient (`step`: its number).

        The loader's batches as they are by default; an online objective samples its completions here.
        """
        return batches

    def loss(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """The micro-batch's summed terms: `loss` (backpropagated) and the logged sums `summarize` turns into means."""
        raise NotImplementedError

    def count(self, batch: dict) -> torch.Tensor:
        """How many units (learned tokens, pairs, ...) the micro-batch's `loss` sums over."""
        return learned_token_count(batch["labels"])

    def summarize(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """The logged means from sums over a whole step (or evaluation) on every rank: each sum / count."""
        return {key: value / max(count, 1) for key, value in sums.items()}

    def evaluate(self, model, loader, max_batches: int) -> dict[str, float]:
        """The evaluation row's held-out metrics, each `eval_` + a name `summarize` returns."""
        sums, count = summed_over(self, model, loader, max_batches)
        return {f"eval_{key}": value for key, value in self.summarize(sums, count).items()}

    def describe(self) -> dict[str, str]:
        """Rows of the table printed before the first step (e.g. what the reference is)."""
        return {"objective": self.cfg.objective.name}

    def model_changes(self) -> list[Change]:
        """What the objective's loss puts on the model while it runs (beside `ftune.model.instrument`'s list)."""
        chunked = self.token_loss is not None and self.token_loss.head is not None
        return [HEAD_CAPTURE] if chunked else []


@torch.no_grad()
def summed_over(objective: Objective, model, loader, max_batches: int) -> tuple[dict[str, float], float]:
    """The objective's sums and count over the loader's first `max_batches` batches (-1: all), on every process."""
    sums: dict[str, torch.Tensor] = {}
    count = None
    with eval_mode(model):
        for index, batch in enumerate(loader):
            if index == max_batches:
                break
            for key, value in objective.loss(model, batch).items():
                sums[key] = sums.get(key, 0) + value.detach().float()
            count = objective.count(batch) + (0 if count is None else count)
    if count is None:
        return {}, 0.0
    totals = reduce(torch.stack([*sums.values(), count.float()]), "sum").tolist()
    return dict(zip(sums, totals[:-1], strict=True)), totals[-1]
