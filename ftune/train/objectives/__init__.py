"""What a run learns from (`objective=`): one class per objective behind the seam `Objective` (`base.py`).

The loop and `ftune train` name no objective; they take the one `build_objective` returns. docs/design.md says
how to add one.
"""

from ftune.config.schema import RunCfg
from ftune.train.objectives.base import Objective
from ftune.train.objectives.grpo import GrpoObjective
from ftune.train.objectives.preference import DpoObjective, KtoObjective
from ftune.train.objectives.sequence_distill import SequenceDistillObjective, sequence_distillation
from ftune.train.objectives.tokens import TokenObjective

OBJECTIVES: dict[str, type[Objective]] = {
    "sft": TokenObjective,
    "distill": TokenObjective,
    "dpo": DpoObjective,
    "kto": KtoObjective,
    "grpo": GrpoObjective,
}
"""`objective.name` -> its class (the names are `ObjectiveCfg.name`'s choices)."""


def build_objective(cfg: RunCfg) -> Objective:
    """The run's objective, before anything loads (it builds the loaders and loads its frozen models itself).

    `distill.mode=sequence` learns the teacher's answers as `sft` learns labels (`sequence_distill.py`).
    """
    if sequence_distillation(cfg):
        return SequenceDistillObjective(cfg)
    return OBJECTIVES[cfg.objective.name](cfg)
