"""Token objectives: `sft` (the labelled tokens' cross-entropy) and `distill` (labels plus a frozen teacher).

Their batches are SFT rows (padded, packed or streamed); their sums are over learned tokens, so the step divides
by the learned tokens of the whole step on every rank; their evaluation is the held-out loss and perplexity
(`ftune.eval.loss.evaluate_loss`, the function `ftune eval` runs).
"""

from accelerate import Accelerator

from ftune.data.dedup import overlap_warning
from ftune.data.pipeline import build_loader, build_split, build_train_split
from ftune.data.stream import build_stream_loader
from ftune.eval.loss import evaluate_loss
from ftune.model.load import load_teacher, shared_vocab_size
from ftune.report.console import console
from ftune.train.losses import build_step_loss
from ftune.train.objectives.base import Objective


class TokenObjective(Objective):
    """`objective=sft`, and `objective=distill` (which loads `distill.teacher` when it attaches)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.step_loss = None
        self.teacher = None

    def build_loaders(self, tokenizer, accelerator: Accelerator) -> tuple[dict, dict]:
        cfg = self.cfg
        batch, attn = cfg.trainer.micro_batch_size, cfg.model.attn_implementation
        train, train_stats = self.train_loader(tokenizer, accelerator)
        held_out = build_split(cfg.data.eval_path, tokenizer, cfg.data) if cfg.data.eval_path else None
        loaders = {
            "train": train,
            "eval": build_loader(held_out, tokenizer, cfg.data, attn, batch, shuffle=False) if held_out else None,
        }
        return loaders, {"train": train_stats, "eval": held_out.stats if held_out else None}

    def train_loader(self, tokenizer, accelerator: Accelerator):
        """The training loader and its statistics.

        Rows built whole (or read from the cache), or with `data.streaming` this process's share of a stream,
        which has no statistics before it is read.
        """
        cfg = self.cfg
        batch, attn = cfg.trainer.micro_batch_size, cfg.model.attn_implementation
        if cfg.data.streaming:
            return build_stream_loader(tokenizer, cfg.data, attn, batch, cfg.seed, accelerator.process_index,
                                       accelerator.num_processes, accelerator.device), None
        train = build_train_split(tokenizer, cfg.data, cfg.seed)
        warning = overlap_warning(train.stats.dedup, cfg.data.eval_path)
        if warning:
            console.print(warning, style="bold red", markup=False, highlight=False, soft_wrap=True)
        loader = build_loader(train, tokenizer, cfg.data, attn, batch, shuffle=True,
                              workers=cfg.trainer.num_workers, seed=cfg.seed)
        return loader, train.stats

    def load_frozen(self) -> None:
        """The distillation teacher (None for sft); its vocabulary is compared with the student's first."""
        self.teacher = load_teacher(self.cfg) if self.cfg.objective.name == "distill" else None

    def attach(self, model, tokenizer) -> None:
        vocab = shared_vocab_size(tokenizer) if self.teacher is not None else None  # what the KL compares
        self.step_loss = build_step_loss(model, self.cfg.trainer, self.teacher, self.cfg.distill, vocab)
        self.token_loss = self.step_loss.without_teacher()

    def loss(self, model, batch: dict):
        return self.step_loss(model, batch)

    def evaluate(self, model, loader, max_batches: int) -> dict[str, float]:
        result = evaluate_loss(model, loader, max_batches, self.token_loss)
        return {"eval_loss": result["loss"], "eval_ppl": result["ppl"]}

    def describe(self) -> dict[str, str]:
        teacher = self.cfg.distill.teacher
        return super().describe() | ({"teacher": teacher} if teacher else {})
