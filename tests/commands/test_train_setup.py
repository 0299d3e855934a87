"""A user's runs: no evaluation data, failed starts that leave nothing, resumes that say what changed, BOM input."""

import json

import pytest

from ftune.cli import main

FAST = ["recipe=tiny_lora", "trainer.micro_batch_size=4", "trainer.eval_every=0", "data.max_length=128"]


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_no_eval_data_runs_to_the_end_on_the_probe(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", *FAST, "trainer.max_steps=2", "data.eval_path=null", f"output_dir={run_dir}"]) == 0
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert set(summary(run_dir)["best_metric"]) == {"probe_ppl"}
    assert "metric: probe_ppl" in (run_dir / "config.yaml").read_text()
    # each row logs the rate its step used: one warm-up step at 0, then the peak (cosine starts there)
    assert [r["lr"] for r in rows(run_dir) if "loss" in r] == [0.0, 0.001]



@pytest.mark.parametrize("kernels", ["on", "off"])
def test_the_start_table_and_summary_list_what_ftune_put_on_the_model(tmp_path, capsys, kernels):
    """`trainer.cpu_kernels` decides the kernels' entries; the chunked loss's head hook is listed either way."""
    run_dir = tmp_path / "run"
    assert main(["train", *FAST, "trainer.max_steps=1", "data.eval_path=null", f"trainer.cpu_kernels={kernels}",
                 f"output_dir={run_dir}"]) == 0
    kernel_sources = ["kernels/host_memory.py", "kernels/lora_linear.py", "kernels/dropout.py"]
    expected = (kernel_sources if kernels == "on" else []) + ["train/head.py"]
    assert [change["source"] for change in summary(run_dir)["model_changes"]] == expected
    table = capsys.readouterr().err  # ftune's console writes to stderr
    assert "changes to the model" in table and ("FusedLoraLinear" in table) == (kernels == "on")


def test_a_failed_start_leaves_nothing_and_the_retry_just_works(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", *FAST, "trainer.max_steps=1", "model.name_or_path=/no/such/model",
                 f"output_dir={run_dir}"]) == 2
    assert "/no/such/model" in capsys.readouterr().err
    assert not run_dir.exists()
    assert main(["train", *FAST, "trainer.max_steps=1", f"output_dir={run_dir}"]) == 0
    assert (run_dir / "final").is_dir()


def test_an_output_dir_that_cannot_be_created_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["train", *FAST, f"output_dir={tmp_path / 'file' / 'run'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"ftune: error: output_dir={tmp_path / 'file' / 'run'}: cannot write to {tmp_path / 'file'} "
        "(choose a directory you can write)"]


@pytest.fixture(scope="module")
def checkpointed_run(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    assert main(["train", *FAST, "trainer.max_steps=4", "trainer.save_every=2", f"output_dir={run_dir}"]) == 0
    return run_dir


def test_resume_refuses_a_change_that_breaks_exactness_and_names_it(checkpointed_run, capsys):
    before = (checkpointed_run / "config.yaml").read_text()
    args = ["train", *FAST, "trainer.max_steps=6", "trainer.save_every=2", f"output_dir={checkpointed_run}",
            "resume=auto"]
    assert main([*args[:-2], "data.max_length=96", *args[-2:]]) == 2
    assert "data.max_length (128 -> 96)" in capsys.readouterr().err
    assert (checkpointed_run / "config.yaml").read_text() == before


def test_resume_applies_and_records_a_safe_change_then_a_forced_one(checkpointed_run):
    args = ["train", *FAST, "trainer.save_every=2", f"output_dir={checkpointed_run}", "resume=auto"]
    assert main([*args, "trainer.max_steps=6"]) == 0
    assert summary(checkpointed_run)["steps"] == 6
    event = [r for r in rows(checkpointed_run) if r.get("event") == "resume"][0]
    assert event == {"step": 4, "event": "resume", "changed": {"trainer.max_steps": [4, 6]}, "forced": {}}
    assert "max_steps: 6" in (checkpointed_run / "config.yaml").read_text()

    assert main([*args, "trainer.max_steps=7", "optim.lr=0.0001", "resume_force=true"]) == 0
    assert summary(checkpointed_run)["resume_forced"] == {"optim.lr": [0.001, 0.0001]}
    assert [r["step"] for r in rows(checkpointed_run) if "loss" in r] == list(range(1, 8))


def test_a_jsonl_with_a_byte_order_mark_and_crlf_trains(tmp_path):
    from ftune.config.compose import ASSETS_DIR

    lines = (ASSETS_DIR / "data" / "chat" / "train.jsonl").read_text().splitlines()[:16]
    path = tmp_path / "excel.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")
    run_dir = tmp_path / "run"
    assert main(["train", *FAST, "trainer.max_steps=1", f"data.path={path}", f"output_dir={run_dir}"]) == 0
    assert summary(run_dir)["steps"] == 1


def test_a_full_disk_while_writing_final_is_one_line_and_leaves_no_half_final(tmp_path, monkeypatch, capsys):
    import errno

    from accelerate import Accelerator

    from ftune.config.compose import load_run_config
    from ftune.model.load import load_tokenizer

    def disk_full(self, directory, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))

    monkeypatch.setattr(type(load_tokenizer(load_run_config([])[0].model)), "save_pretrained", disk_full)
    run_dir = tmp_path / "run"
    # The patch reaches this process only: the job takes the precision an earlier test fixed here, else it
    # would train in a child process (`fits_this_process`) and write final/ untouched.
    precision = f"trainer.mixed_precision={Accelerator(cpu=True).mixed_precision}"
    assert main(["train", *FAST, "trainer.max_steps=1", precision, f"output_dir={run_dir}"]) == 1
    err = capsys.readouterr().err  # the plan and data tables come first, on the same stream
    errors = [line for line in err.splitlines() if line.startswith("ftune: error")]
    assert len(errors) == 1 and "cannot write" in errors[0] and "No space left on device" in errors[0], err
    assert err.rstrip().endswith(errors[0]) and "Traceback" not in err
    assert not (run_dir / "final").exists()
    assert not list(run_dir.glob(".tmp-*"))


def test_a_job_with_another_precision_than_the_process_runs_in_a_child():
    """Accelerate fixes precision once per process and has no public reset: ftune trains such a job elsewhere."""
    from accelerate import Accelerator

    from ftune.commands.train import fits_this_process
    from ftune.config.compose import load_run_config

    process = Accelerator(cpu=True).mixed_precision  # whatever an earlier test left, or "no"
    other = "bf16" if process == "no" else "no"
    same, _ = load_run_config([f"trainer.mixed_precision={process}"])
    different, _ = load_run_config([f"trainer.mixed_precision={other}"])
    compiled, _ = load_run_config([f"trainer.mixed_precision={process}", "trainer.compile=true"])
    assert fits_this_process(same) and not fits_this_process(different) and not fits_this_process(compiled)
