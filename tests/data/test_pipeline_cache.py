"""The data cache: its key covers the code that shapes rows, concurrent builders never clash, tests keep their own.

The concurrency test runs two real processes on one cold cache and makes them race on purpose: each waits,
after finding no entry, until the other has found none too, so both build and both publish the same entry.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ftune.atomic import STAGING_PREFIX
from ftune.cache import cache_dir, files_fingerprint
from ftune.config.schema import DataCfg
from ftune.data import pipeline
from ftune.data.templates import TEMPLATES_DIR

HI_HELLO = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
BUILDER_TIMEOUT_S = 300
"""Two processes importing torch and transformers on a busy 2-core machine: generous, but never a hang."""

BUILDER = """
import json, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from ftune.config.schema import DataCfg
from ftune.data import pipeline

data, tokenizer_dir, barrier, name = sys.argv[1:]

def wait_for_both(tag):
    Path(barrier, f"{tag}-{name}").touch()
    deadline = time.monotonic() + 120
    while len(list(Path(barrier).glob(f"{tag}-*"))) < 2:
        if time.monotonic() > deadline:
            sys.exit(f"the other builder never reached {tag!r}")
        time.sleep(0.01)

tokenize_source = pipeline.tokenize_source

def tokenize_once_both_missed(*args, **kwargs):
    wait_for_both("missed")  # build_rows tokenizes only after a cache miss: now both build and publish
    return tokenize_source(*args, **kwargs)

pipeline.tokenize_source = tokenize_once_both_missed
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
split = pipeline.build_split(data, tokenizer, DataCfg(path=data, eval_path=None))
print(json.dumps({"from_cache": split.from_cache, "rows": split.rows.to_list()}))
"""


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_two_processes_building_the_same_split_at_once_both_succeed_and_publish_one_entry(tmp_path,
                                                                                          tiny_model_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": HI_HELLO}] * 50)
    (tmp_path / "barrier").mkdir()
    env = {**os.environ, "FTUNE_CACHE": str(tmp_path / "cache")}
    builders = [subprocess.Popen([sys.executable, "-c", BUILDER, data, str(tiny_model_path), str(tmp_path / "barrier"),
                                  name], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for name in ("a", "b")]
    results = []
    for builder in builders:
        out, err = builder.communicate(timeout=BUILDER_TIMEOUT_S)
        assert builder.returncode == 0, err[-3000:]
        results.append(json.loads(out.splitlines()[-1]))
    assert [result["from_cache"] for result in results] == [False, False]  # both really built it
    assert results[0]["rows"] == results[1]["rows"] and len(results[0]["rows"]) == 50
    entries = sorted(p.name for p in (tmp_path / "cache" / "data").iterdir())
    assert len(entries) == 1 and not entries[0].startswith(STAGING_PREFIX), entries
    assert (tmp_path / "cache" / "data" / entries[0] / "stats.json").is_file()


def test_the_entry_a_builder_publishes_is_served_whole(tmp_path, monkeypatch, tiny_model_path):
    from transformers import AutoTokenizer

    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": HI_HELLO}] * 3)
    built = pipeline.build_split(data, tokenizer, DataCfg(path=data, eval_path=None))
    served = pipeline.build_split(data, tokenizer, DataCfg(path=data, eval_path=None))
    assert (built.from_cache, served.from_cache) == (False, True)
    assert served.rows.to_list() == built.rows.to_list() and served.stats == built.stats
    assert [p.name for p in cache_dir("data").iterdir() if p.name.startswith(STAGING_PREFIX)] == []


def test_a_change_in_the_row_shaping_code_changes_the_cache_key(tmp_path, monkeypatch, tiny_model_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": HI_HELLO}])
    sources, cfg = [pipeline.DataSourceCfg(data, 1.0, "auto")], DataCfg(path=data, eval_path=None)
    before = pipeline.split_fingerprint(sources, tokenizer, cfg, seed=0)
    assert pipeline.split_fingerprint(sources, tokenizer, cfg, seed=0) == before
    monkeypatch.setattr(pipeline, "code_fingerprint", lambda: "a different pipeline")
    assert pipeline.split_fingerprint(sources, tokenizer, cfg, seed=0) != before


def test_the_code_fingerprint_covers_every_module_and_template_that_shapes_rows(monkeypatch):
    names = {path.name for path in pipeline.row_shaping_files()}
    assert {"formats.py", "templates.py", "labels.py", "packing.py", "pipeline.py", "mask.py"} <= names
    assert {path.name for path in TEMPLATES_DIR.glob("*.jinja")} <= names
    assert not {"collate.py", "sampler.py"} & names  # they act per batch, on rows already cached
    pipeline.code_fingerprint.cache_clear()
    plain = pipeline.code_fingerprint()
    monkeypatch.setattr(pipeline, "files_fingerprint", lambda paths: "other code")
    pipeline.code_fingerprint.cache_clear()
    assert pipeline.code_fingerprint() != plain  # the code's hash is part of it
    monkeypatch.undo()
    monkeypatch.setattr(pipeline, "ROW_SHAPING_LIBRARIES", ("transformers",))
    pipeline.code_fingerprint.cache_clear()
    assert pipeline.code_fingerprint() != plain  # so are the tokenizing libraries' versions
    monkeypatch.undo()
    pipeline.code_fingerprint.cache_clear()
    assert pipeline.code_fingerprint() == plain
    pipeline.code_fingerprint()
    assert pipeline.code_fingerprint.cache_info().hits >= 1  # hashed once per process


def test_files_fingerprint_follows_content_and_names(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    before = files_fingerprint([a, b])
    assert files_fingerprint([a, b]) == before
    b.write_text("y = 3\n")
    assert files_fingerprint([a, b]) != before
    b.write_text("y = 2\n")
    assert files_fingerprint([a, b]) == before
    b.rename(tmp_path / "c.py")
    assert files_fingerprint([a, tmp_path / "c.py"]) != before


def test_the_test_session_has_its_own_cache_and_subprocesses_inherit_it():
    root = Path(os.environ["FTUNE_CACHE"])
    assert root.is_relative_to(tempfile.gettempdir())
    assert not root.is_relative_to(Path.home() / ".cache")
    child = subprocess.run([sys.executable, "-c", "from ftune.cache import cache_dir; print(cache_dir('data'))"],
                           capture_output=True, text=True, check=True)
    assert Path(child.stdout.strip()) == root / "data"


KILLED_BUILDER = """
import os, signal, sys
from transformers import AutoTokenizer
from ftune.config.schema import DataCfg
from ftune.data import pipeline

data, tokenizer_dir = sys.argv[1:]

def killed(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # after every record is tokenized, before the rows are written

pipeline.write_rows = killed
pipeline.build_split(data, AutoTokenizer.from_pretrained(tokenizer_dir), DataCfg(path=data, eval_path=None))
"""


def test_a_build_killed_halfway_leaves_no_entry_and_cache_clear_removes_what_it_left(tmp_path, monkeypatch, capsys,
                                                                                    tiny_model_path):
    from transformers import AutoTokenizer

    from ftune.cli import main

    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": HI_HELLO}] * 5)
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILDER, data, str(tiny_model_path)], capture_output=True,
                            text=True, env={**os.environ}, timeout=BUILDER_TIMEOUT_S)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert main(["data", "--cache-info", "--json"]) == 0
    [left] = json.loads(capsys.readouterr().out)["entries"]
    assert left["entry"].startswith(STAGING_PREFIX) and left["state"].startswith("incomplete") and left["mib"] >= 0

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    split = pipeline.build_split(data, tokenizer, DataCfg(path=data, eval_path=None))
    assert (split.from_cache, len(split.rows)) == (False, 5)  # the half-built staging directory was never read
    assert main(["data", "--cache-info", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    complete = [entry for entry in entries if entry["state"] == "complete"]
    assert len(entries) == 2 and len(complete) == 1
    assert complete[0]["sources"] == [data] and complete[0]["rows"] == 5 and complete[0]["settings"]["packing"] is False

    assert main(["data", "--cache-clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().err
    assert list((tmp_path / "cache" / "data").iterdir()) == []
