"""`ftune eval` end to end: base, adapter and merged model of one short tiny_lora run, side by side."""

import json

import pytest

from ftune.cli import main

HELD_OUT, PROBE_DOCS = 16, 16
"""Examples of the shipped validation and probe sets used here, to keep the module fast."""


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, tiny_model_path):
    """The first held-out conversations and probe documents of the shipped data sets."""
    assets = tiny_model_path.parents[1] / "data"
    root = tmp_path_factory.mktemp("data")
    for name, source, count in (("validation", "chat/validation.jsonl", HELD_OUT), ("probe", "probe/general.jsonl",
                                                                                     PROBE_DOCS)):
        lines = (assets / source).read_text().splitlines()[:count]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return {"data": root / "validation.jsonl", "probe": root / "probe.jsonl"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_data):
    """One short tiny_lora run (its evaluation on the small sets), and its adapter merged by `ftune merge`."""
    run = tmp_path_factory.mktemp("runs") / "lora"
    assert main(["train", "recipe=tiny_lora", "trainer.max_steps=20", f"data.eval_path={small_data['data']}",
                 f"probe.path={small_data['probe']}", f"output_dir={run}"]) == 0
    assert main(["merge", f"adapter={run / 'final'}", f"out={run / 'merged'}"]) == 0
    return run


def eval_args(small_data, *extra: str) -> list[str]:
    return ["eval", f"data.eval_path={small_data['data']}", f"probe.path={small_data['probe']}", *extra]


def test_base_adapter_and_merged_side_by_side(run_dir, small_data, tmp_path, capsys):
    out = tmp_path / "eval.json"
    capsys.readouterr()
    args = eval_args(small_data, f"model={run_dir / 'final'}", f"models=[{run_dir / 'merged'}]", "generate=2",
                     "max_new_tokens=8", f"out={out}")
    assert main(args) == 0
    table = capsys.readouterr().out
    assert table.count("ftune eval") == 1 and "adapter" in table and "merged" in table and "probe_drift" in table
    rows = json.loads(out.read_text())
    base, adapter, merged = rows.values()
    assert [base["kind"], adapter["kind"], merged["kind"]] == ["base", "adapter", "merged"]
    assert abs(adapter["eval_loss"] - merged["eval_loss"]) <= 1e-4
    assert abs(adapter["probe_ppl"] - merged["probe_ppl"]) <= 1e-3 * adapter["probe_ppl"]
    assert adapter["eval_loss"] < base["eval_loss"]  # 20 steps on the task lower its held-out loss
    assert base["probe_drift"] == 0.0 and adapter["probe_drift"] == adapter["probe_ppl"] / base["probe_ppl"] - 1
    for row in rows.values():
        assert set(row) >= {"eval_loss", "eval_ppl", "probe_ppl", "probe_drift", "exact_match", "f1"}
        assert 0.0 <= row["exact_match"] <= row["f1"] <= 1.0
        assert row["generated"] == 2 and row["answer_tokens"] <= 8
    records = [json.loads(line) for line in (tmp_path / "generations.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["prompt"][-1]["role"] == "user" and records[0]["reference"]
    for name, row in rows.items():
        answers = [record["answers"][name] for record in records]
        assert sum(a["f1"] for a in answers) / 2 == pytest.approx(row["f1"])
        assert sum(a["new_tokens"] for a in answers) / 2 == row["answer_tokens"]
    assert f"generation 1: {records[0]['prompt'][-1]['content'][:40]}" in table
    assert records[0]["reference"][:40] in table and "reference" in table


def test_packed_and_unpacked_evaluation_give_the_same_loss(tiny_model_path, small_data, tmp_path):
    losses = []
    for packing in ("false", "true"):
        out = tmp_path / f"packing-{packing}.json"
        args = eval_args(small_data, f"model={tiny_model_path}", "probe.path=null", "generate=0",
                         f"data.packing={packing}", f"out={out}")
        assert main(args) == 0
        (row,) = json.loads(out.read_text()).values()
        losses.append(row["eval_loss"])
    assert abs(losses[0] - losses[1]) <= 1e-5 * losses[0]


def test_run_reproduces_the_runs_own_final_evaluation(run_dir, tmp_path):
    """`run=` takes the run's held-out data, probe, batch size, precision (bf16 autocast) and chunked loss."""
    out = tmp_path / "eval.json"
    assert main(["eval", f"run={run_dir}", "generate=0", f"out={out}"]) == 0
    rows = json.loads(out.read_text())
    adapter = rows[str(run_dir / "final")]
    summary = json.loads((run_dir / "summary.json").read_text())
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in logged if r["step"] == summary["final_weights_step"] and "eval_loss" in r)
    assert abs(adapter["eval_loss"] - final["eval_loss"]) <= 1e-6
    assert abs(adapter["probe_ppl"] - final["probe_ppl"]) <= 1e-6 * final["probe_ppl"]


@pytest.mark.slow
def test_benchmark_base_and_adapter_side_by_side_offline(run_dir, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["eval", f"model={run_dir / 'final'}", "data.eval_path=null", "probe.path=null",
                 "tasks=[tinyworld_tense]", "limit=12", f"out={out}"]) == 0
    table = capsys.readouterr().out
    assert "tinyworld_tense/acc" in table and "±" in table
    base, adapter = json.loads(out.read_text()).values()
    for row in (base, adapter):
        assert 0.0 <= row["tinyworld_tense/acc"] <= 1.0 and row["tinyworld_tense/acc_stderr"] >= 0.0
        assert (row["tinyworld_tense/acc"] * 12).is_integer()  # 12 items scored, each right or wrong
    assert not (tmp_path / "generations.jsonl").exists()  # data.eval_path=null: nothing generated


@pytest.mark.slow
@pytest.mark.parametrize(("task", "expected"), [("hellaswag", "the dataset of task hellaswag is not in the datasets "
                                                 "cache"), ("no_such_task", "no_such_task is not an lm-eval task")])
def test_benchmark_that_cannot_run_offline_fails_in_one_line(tmp_path, capsys, monkeypatch, task, expected):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "empty-cache"))
    capsys.readouterr()
    assert main(["eval", "model=nowhere/model", "data.eval_path=null", "probe.path=null", f"tasks=[{task}]"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ftune: error: ")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in err, err
    assert "Error" not in errors[0]  # no library class names


@pytest.fixture
def bad_models(tmp_path, random_llama, run_dir, tiny_model_path):
    """Each bad model argument (by case name) and the text its one-line error must contain."""
    empty = tmp_path / "empty"
    empty.mkdir()
    small_base = tmp_path / "small_base"
    random_llama().save_pretrained(small_base)
    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    (mismatched / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(small_base)}))
    weights = (run_dir / "final" / "adapter_model.safetensors").read_bytes()
    (mismatched / "adapter_model.safetensors").write_bytes(weights)
    return {
        "missing path": (f"model={tmp_path / 'nowhere'}", "no such file or directory"),
        "not a model": (f"model={empty}", "neither a model (config.json) nor an adapter (adapter_config.json)"),
        "base of other shapes": (f"models=[{tiny_model_path},{mismatched}]", "size mismatch for"),
        "no model": ("data.max_length=64", "model: missing"),
        "unknown key": ("modle=x", "modle: unknown key"),
    }


@pytest.mark.parametrize("case", ["missing path", "not a model", "base of other shapes", "no model", "unknown key"])
def test_bad_input_is_one_line(bad_models, small_data, tmp_path, capsys, case):
    argument, expected = bad_models[case]
    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(eval_args(small_data, argument, "probe.path=null", "generate=0", f"out={out}")) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ftune: error: ")]
    assert len(errors) == 1 and expected in errors[0] and err.strip().endswith(errors[0]), err
    assert "Traceback" not in err and not out.exists()


def test_kto_rows_as_held_out_data_are_refused_in_one_line(tiny_model_path, tmp_path, capsys):
    """Unpaired rows are neither conversations nor pairs: one line naming the file, before any model loads."""
    kto = tiny_model_path.parents[1] / "data" / "pairs" / "kto_validation.jsonl"
    out = tmp_path / "eval.json"
    assert main(["eval", f"model={tiny_model_path}", f"data.eval_path={kto}", "probe.path=null", "generate=0",
                 f"out={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ftune: error: data.eval_path={kto}: unpaired preference rows") and "\n" not in err
    assert not out.exists()
