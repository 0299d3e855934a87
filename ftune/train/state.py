"""Everything a resumed run needs besides weights, optimizer, scheduler and RNG (which accelerate saves)."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    """Current pass over the training data."""
    batch_in_epoch: int = 0
    """Micro-batches of the current epoch already consumed (on each process)."""
    tokens: int = 0
    """Real (non-pad) tokens trained on, all processes."""
    learned_tokens: int = 0
    """Tokens that carried a loss, all processes."""
    best_metric: float | None = None
    """Best value of early_stop.metric so far (within the forgetting guard)."""
    best_step: int | None = None
    """Step of that evaluation; its checkpoint is never pruned."""
    evals_without_improvement: int = 0
    """Evaluations since the best one (early-stopping patience)."""
    base_probe_ppl: float | None = None
    """Probe perplexity of the base model, the reference for probe_drift."""
    base_task_scores: dict[str, float] | None = None
    """Each probe task's score for the base model, the reference for `<task>_drift` (`probe.tasks`)."""

    def advance(self, tokens: int, learned_tokens: int) -> None:
        """Count one optimizer step and the tokens it trained on."""
        self.step += 1
        self.tokens += tokens
        self.learned_tokens += learned_tokens

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> "TrainState":
        return cls(**json.loads((directory / STATE_FILE).read_text()))
