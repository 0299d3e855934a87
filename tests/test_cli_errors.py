"""Every subcommand answers a wrong argument with one line in ftune's words.

Exit 2, the key named, no traceback, and no OmegaConf/Hydra class name (issue 12: "no error a user sees may
leak OmegaConf/Hydra internals").
"""

import pytest

from ftune.cli import main

LIBRARY_WORDS = ("DictConfig", "ListConfig", "ValueNode", "omegaconf", "OmegaConf", "hydra", "Hydra", "Traceback",
                 "Exception", "ValidationError", "Float", "Integer", "object_type", "full_key")

WRONG = {
    "train": [("optim.lrr=1", "optim.lrr: unknown key"), ("lora.target_modules={a:1}", "expected a list"),
              ("optim.lr=abc", "optim.lr: expected a number, got 'abc'"),
              ("lora.r=1.5", "lora.r: expected a whole number, got 1.5"),
              ("trainer.max_steps=[1]", "trainer.max_steps: expected a whole number"),
              ("data.roles=x", "data.roles: expected a mapping"), ("~optim.lr", "~optim.lr: cannot remove"),
              ("=3", "argument '=3': expected key=value"), ("trainer", "argument 'trainer': expected key=value"),
              ("data.max_length.x=1", "data.max_length.x: unknown key (data.max_length is a whole number"),
              ("model=nope", "no option 'model/nope'"), ("recipe=./missing.yaml", "recipe=./missing.yaml: no such"),
              ("model.add_tokens=[<tense>,</tense>]", "model.add_tokens=[<tense>,</tense>]: cannot parse"),
              ("optim.betas=[0.9,0.99", "optim.betas=[0.9,0.99: cannot parse this argument (quote a value")],
    "data": [("optim.lrr=1", "optim.lrr: unknown key"), ("data.packing=maybe", "data.packing: expected true or false"),
             ("probe.tasks=[[a]]", "probe.tasks[0]=['a'] (expected a string: probe.tasks is a list of them)")],
    "plan": [("lora.r=x", "lora.r: expected a whole number"), ("gpus=0", "gpus=0: expected a positive number"),
             ("lora.target_modules={a:1}", "lora.target_modules: expected a list"),
             ("lora.target_modules=[{a:1}]", "lora.target_modules[0]={'a': 1} (expected a string"),
             ("optim.betas=[0.9,x]", "optim.betas[1]: expected a number, got 'x'")],
    "merge": [("foo=1", "foo: unknown key"), ("density=x", "density: expected a number"),
              ("adapters=x", "out: missing"), ("out", "argument 'out': expected key=value"),
              ("weights={a:1}", "weights: expected a list"), ("weights=[0.5,", "weights=[0.5,: cannot parse")],
    "eval": [("packing=true", "packing: unknown key"), ("data.packing=maybe", "data.packing: expected true or false"),
             ("batch_size=x", "batch_size: expected a whole number, got 'x'"), ("+extra=1", "extra: unknown key"),
             ("tasks=[{a:1}]", "tasks[0]={'a': 1} (expected a string")],
}
CASES = [(command, arg, expected) for command, items in WRONG.items() for arg, expected in items]


@pytest.mark.parametrize(("command", "arg", "expected"), CASES)
def test_wrong_argument_is_one_line_in_ftunes_words(command, arg, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--cfg", "job"] if command != "plan" else []
    assert main([command, *flags, arg]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("ftune: error: "), err
    assert expected in err, err
    assert not [word for word in LIBRARY_WORDS if word in err], err


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_cfg_job_prints_and_does_not_run(command, capsys):
    args = ["adapter=/nowhere", "out=/nowhere/merged"] if command == "merge" else ["model=/nowhere"]
    assert main([command, "--cfg", "job", *args]) == 0
    assert "/nowhere" in capsys.readouterr().out


def test_flags_a_command_does_not_honour_are_not_offered(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "-m", "adapter=a"])
    assert "unrecognized arguments: -m" in capsys.readouterr().err
