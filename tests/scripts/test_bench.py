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


def test_phase_clock_gives_each_call_to_the_step_it_ends_in_and_counts_a_nested_call_once(monkeypatch):
    clock, ends = bench.PhaseClock(), iter([10.0, 10.5, 20.0])
    monkeypatch.setattr(bench.time, "time", lambda: next(ends))  # each call's end, in the steps' clock
    inner = clock.wrap("generate", lambda: None)
    outer = clock.wrap("generate", lambda: inner())
    outer()  # one call: the inner one runs inside it
    outer()
    clock.wrap("reward", lambda: None)()
    assert [end for end, _ in clock.calls["generate"]] == [10.0, 10.5]
    steps = clock.per_step([15.0, 25.0])
    assert steps["generate"][1] == 0.0 and steps["generate"][0] > 0
    assert steps["reward"][0] == 0.0 and steps["reward"][1] > 0


def test_grpo_figures_count_the_timed_steps_completions_and_split_each_step():
    log = bench.GrpoLog(step_end=[110.0, 112.0, 113.0, 115.0], positions=[24, 24, 20, 10])
    log.clock.calls = {"generate": [(111.0, 1.0), (112.5, 0.5), (114.0, 1.2)], "rollout": [(114.1, 1.5)],
                       "forward": [(114.5, 0.2)], "backward": [(114.8, 0.25)]}
    model = bench.Model("m", Path("m"), warmup=2, timed=2, grad_accum=1)
    result = bench.summarize_grpo(log, 100.0, model, rewards=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
                                  lengths=[20.0, 18.0, 10.0, 12.0], extra={"mixed_precision": "no"})
    completions = bench.GRPO_PROMPTS * bench.GRPO_GENERATIONS
    assert result["completions_per_s"] == pytest.approx(2 * completions / 3)  # steps 3-4: 2 steps in 3 s
    assert result["completion_tokens_per_s"] == pytest.approx(22 * completions / 3)
    assert result["step_s"] == pytest.approx(1.5) and result["mean_completion_length"] == pytest.approx(11.0)
    assert result["decoded_positions"] == pytest.approx(15.0)
    assert result["generate_s_per_position"] == pytest.approx((0.5 + 1.2) / 30)
    assert result["split"]["generate"] == [0.0, 1.0, 0.5, 1.2]
    assert result["split"]["rollout_other"][3] == pytest.approx(0.3)  # the rollout less generate (no reward timed)
    assert result["split"]["other"][3] == pytest.approx(2.0 - 1.5 - 0.2 - 0.25)
    assert result["reward_first"] == pytest.approx(0.2) and result["reward_last"] == pytest.approx(0.5)
    assert result["first_step_s"] == pytest.approx(10.0)


def test_grpo_prompts_are_recorded_once_per_group_and_compared_across_runs():
    log = bench.GrpoLog()
    log.record_prompts([[{"role": "user", "content": "a"}]] * bench.GRPO_GENERATIONS + ["b"] * bench.GRPO_GENERATIONS)
    assert log.prompts == [["a", "b"]]
    run = {"prompts": log.prompts}
    assert bench.same_prompts({"ftune_grpo": [run, run], "trl_grpo": [run]})
    assert not bench.same_prompts({"ftune_grpo": [run], "trl_grpo": [{"prompts": [["b", "a"]]}]})


@pytest.mark.slow
def test_ftune_and_trl_dpo_workers_train_the_same_pairs_to_the_same_losses(tmp_path, monkeypatch):
    """The bench's DPO workers end to end on the embedded model, TRL's DPOTrainer and ftune.

    From one start adapter, on the same batches, to losses within 1e-4 (the bench's target is 1e-3). ftune's
    `mixed_precision=auto` picks bf16 on a CPU with bf16 units: the worker processes are told the CPU has none
    (`FTUNE_CPU_BF16=0`), so ftune runs fp32, the precision of TRL's configuration here, on every machine.
    """
    pytest.importorskip("trl")
    monkeypatch.setenv("FTUNE_CPU_BF16", "0")
    model = bench.Model("tiny", bench.TINY_MODEL, warmup=1, timed=2, data=bench.PAIRS_TRAIN,
                        adapter=bench.ensure_start_adapter(tmp_path, bench.TINY_MODEL), objective="dpo")
    runs = {name: [bench.run_config(next(c for c in bench.DPO_CONFIGS if c.name == name), model)]
            for name in ("ftune_dpo", "trl_dpo_no_gc_fp32")}
    assert bench.same_pairs(runs)
    parity = bench.loss_parity(runs)
    assert abs(parity["first_loss_minus_ln2"]) < 1e-6
    assert parity["loss_gap_max_same_precision"]["trl_dpo_no_gc_fp32"] < 1e-4
