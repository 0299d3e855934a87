"""`TrainState`: step and token counting, and the JSON round trip a resumed run depends on."""

import json
from dataclasses import asdict, fields

from ftune.train.state import STATE_FILE, TrainState


def test_advance_counts_one_step_and_adds_tokens():
    state = TrainState()
    state.advance(tokens=100, learned_tokens=40)
    state.advance(tokens=50, learned_tokens=10)
    assert (state.step, state.tokens, state.learned_tokens) == (2, 150, 50)
    assert (state.epoch, state.batch_in_epoch) == (0, 0)  # the loop, not advance, moves through the data


def test_save_then_load_round_trips_every_field(tmp_path):
    """Every field is set to a value unlike its default, so a field that is dropped or renamed fails here."""
    state = TrainState(
        step=7, epoch=1, batch_in_epoch=3, tokens=12345, learned_tokens=6789, best_metric=2.4375, best_step=5,
        evals_without_improvement=2, base_probe_ppl=31.25, base_task_scores={"tinyworld_tense": 0.975},
    )
    assert all(getattr(state, f.name) != f.default for f in fields(TrainState))
    state.save(tmp_path)
    assert (tmp_path / STATE_FILE).is_file()
    loaded = TrainState.load(tmp_path)
    assert loaded == state
    assert json.loads((tmp_path / STATE_FILE).read_text()) == asdict(state)


def test_a_fresh_state_round_trips_its_nones(tmp_path):
    TrainState().save(tmp_path)
    loaded = TrainState.load(tmp_path)
    assert loaded == TrainState()
    assert loaded.best_metric is None and loaded.best_step is None and loaded.base_probe_ppl is None


def test_loaded_state_keeps_counting(tmp_path):
    state = TrainState(step=3, tokens=30, learned_tokens=9)
    state.save(tmp_path)
    resumed = TrainState.load(tmp_path)
    resumed.advance(tokens=10, learned_tokens=1)
    assert (resumed.step, resumed.tokens, resumed.learned_tokens) == (4, 40, 10)
