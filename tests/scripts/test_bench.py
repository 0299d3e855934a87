"""The benchmark's arithmetic: which batches and seconds count, and how tokens are told from padding."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # scripts/ is not a package

import bench  # noqa: E402


def batch(mask: list[list[int]], labels: list[list[int]], **extra) -> dict:
    return {"input_ids": torch.zeros(len(mask), len(mask[0]), dtype=torch.long),
            "attention_mask": torch.tensor(mask), "labels": torch.tensor(labels), **extra}


def test_counts_real_slots_and_learned_tokens_of_padded_packed_and_padding_free_batches():
    log = bench.StepLog()
    log.count(batch([[1, 1, 0], [1, 0, 0]], [[5, 5, -100], [-100, -100, -100]]))
    packed = batch([[1, 1, 1]], [[-100, 6, 7]], num_tokens=torch.tensor(2))  # ftune: 4D mask, own count
    packed["attention_mask"] = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    log.count(packed)
    log.count({"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.tensor([[1, 2, 3, 4]])})
    assert log.real == [3, 2, 4]
    assert log.slots == [6, 3, 4]
    assert log.learned == [1, 2, 3]  # the first label never counts: nothing predicts it


def test_throughput_skips_the_warm_up_steps_batches_and_seconds():
    log = bench.StepLog(real=[100] * 2 + [10] * 4, slots=[200] * 6, sequences=[4] * 6,
                        sequence_tokens=[100] * 2 + [10] * 4, learned=[50] * 2 + [5] * 4,
                        step_end=[1000.0, 1002.0, 1003.0], loss=[3.0, 2.0, 1.0])
    model = bench.Model("m", Path("m"), warmup=1, timed=2, grad_accum=2)
    result = bench.summarize_worker(log, started=990.0, model=model, extra={"mixed_precision": "bf16"})
    assert result["real_tokens_per_s"] == pytest.approx(40 / 3)  # steps 2-3: 4 micro-batches in 3 s
    assert result["learned_tokens_per_s"] == pytest.approx(20 / 3)
    assert result["first_step_s"] == pytest.approx(10.0)
    assert result["padding_share"] == pytest.approx(1 - 240 / 1200)
    assert result["final_loss"] == pytest.approx(2.0)
    assert result["batches"] == [(4, 100)] * 2 + [(4, 10)] * 4


def test_one_row_pairs_count_their_computed_tokens_and_the_two_sequences_they_score():
    from ftune.data.collate import PairCollator

    rows = [{"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]},
            {"prompt_ids": [4], "chosen_ids": [3], "rejected_ids": [2, 1]}]
    log = bench.StepLog()
    log.count(PairCollator(0, shared_mask="sdpa")(rows))
    log.count(PairCollator(0)(rows))
    assert log.real == [9, 12] and log.slots == [10, 16]  # what each forward computed
    assert log.sequences == [4, 4] and log.sequence_tokens == [12, 12]  # what each scored: the same pairs
    assert log.learned == [6, 6]


def test_batches_are_identical_only_when_every_run_saw_the_same_rows_and_tokens():
    same = {"ftune": [{"batches": [(4, 700), (4, 650)]}] * 2, "trl": [{"batches": [(4, 700), (4, 650)]}]}
    assert bench.identical_batches(same)
    other_rows = same | {"trl": [{"batches": [(4, 700), (4, 651)]}]}
    assert not bench.identical_batches(other_rows)


def test_same_pairs_takes_off_trls_extra_token_per_sequence_and_nothing_else():
    ftune = {"batches": [(8, 648), (8, 678)]}
    assert bench.same_pairs({"ftune_dpo": [ftune], "trl_dpo_fp32": [{"batches": [(8, 656), (8, 686)]}]})
    assert not bench.same_pairs({"ftune_dpo": [ftune], "trl_dpo_fp32": [{"batches": [(8, 648), (8, 678)]}]})


@pytest.mark.slow
def test_ftune_and_trl_dpo_workers_train_the_same_pairs_to_the_same_losses(tmp_path):
    """The bench's DPO workers end to end on the embedded model, TRL's DPOTrainer and ftune.

    From one start adapter, on the same batches, to losses within 1e-4 (the bench's target is 1e-3).
    """
    pytest.importorskip("trl")
    model = bench.Model("tiny", bench.TINY_MODEL, warmup=1, timed=2, data=bench.PAIRS_TRAIN,
                        adapter=bench.ensure_start_adapter(tmp_path, bench.TINY_MODEL), objective="dpo")
    runs = {name: [bench.run_config(next(c for c in bench.DPO_CONFIGS if c.name == name), model)]
            for name in ("ftune_dpo", "trl_dpo_no_gc_fp32")}
    assert bench.same_pairs(runs)
    parity = bench.loss_parity(runs)
    assert abs(parity["first_loss_minus_ln2"]) < 1e-6
    assert parity["loss_gap_max_same_precision"]["trl_dpo_no_gc_fp32"] < 1e-4
