"""objective=grpo: completions cut at their stop token, log-probs as sampled, exact accumulation, the user's rewards."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from ftune.cli import main
from ftune.config.compose import load_run_config
from ftune.eval.generation import Sampled, completion_mask, left_padded
from ftune.model.load import load_tokenizer, prepare_model
from ftune.train.objectives import build_objective
from ftune.train.objectives.grpo import on_completions

FAST = ["recipe=tiny_grpo", "grpo.num_generations=2", "grpo.max_completion_length=8", "trainer.micro_batch_size=2",
        "trainer.eval_every=0", "data.eval_path=null", "grpo.reward_weights=null"]


def test_completions_are_masked_after_their_stop_token():
    ids = torch.tensor([[4, 9, 0, 0], [4, 5, 6, 7], [9, 9, 3, 0]])
    mask, truncated = completion_mask(ids, [9])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_left_padding_puts_every_prompt_against_the_completion():
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def objective_and_model(*overrides):
    cfg = load_run_config(["recipe=tiny_grpo", *overrides])[0]
    tokenizer = load_tokenizer(cfg.model)
    objective = build_objective(cfg)
    loaders, _ = objective.build_loaders(tokenizer, None)
    model = prepare_model(cfg)
    objective.attach(model, tokenizer)
    return objective, model, loaders["train"]


def test_completions_stop_at_the_templates_end_of_turn_and_the_models_own_eos_ids():
    """The embedded model declares `<|im_end|>` (2) and `<|endoftext|>` (0), as Qwen's do: both end a completion."""
    objective, model, _ = objective_and_model()
    assert objective.backend.settings.stop_ids == [0, 2]
    assert objective.tokenizer.convert_ids_to_tokens([0, 2]) == ["<|endoftext|>", "<|im_end|>"]


def fixed_rollout(prompts: list[list[int]], completions: list[list[int]], pad: int) -> Sampled:
    """What `sample_completions` returns for these prompts (one completion each), without sampling."""
    prompt_ids, prompt_mask = left_padded(prompts, pad, "cpu")
    width = max(map(len, completions))
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in completions])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in completions])
    return Sampled(prompt_ids, prompt_mask, ids, mask, torch.zeros(len(prompts), dtype=torch.bool))


def test_a_left_padded_row_scores_its_completion_as_the_row_alone_does():
    """Positions count from each prompt's first token, as `generate` counts them: padding changes nothing."""
    objective, model, _ = objective_and_model("grpo.share_prompt=false")  # a row per completion
    model.eval()
    prompts, completions = [[1, 20, 21, 22, 23, 24], [1, 30]], [[40, 41, 42], [50, 51]]
    pad = objective.tokenizer.pad_token_id
    together = objective.training_batch(model, fixed_rollout(prompts, completions, pad))
    with torch.no_grad():
        both = objective.logps.per_token(model, together)
        for row in range(2):
            alone = objective.training_batch(model, fixed_rollout(prompts[row:row + 1], completions[row:row + 1], pad))
            single = objective.logps.per_token(model, alone)[0]
            labelled = alone["labels"][0, 1:] != -100
            torch.testing.assert_close(both[row][together["labels"][row, 1:] != -100], single[labelled],
                                       rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share", [True, False])
@pytest.mark.parametrize("loss", ["dapo", "grpo", "dr_grpo", "bnpo"])
def test_two_micro_batches_of_four_prompts_give_the_gradient_of_eight(loss, share, monkeypatch):
    """The loop's normalisation (the summed losses over the step's summed counts) on fixed completions.

    With each group in one row and with a row per completion: the count is of completions or their tokens, not rows.
    """
    objective, model, loader = objective_and_model(f"grpo.loss={loss}", "grpo.num_generations=2",
                                                   "trainer.micro_batch_size=8", "grpo.beta=0.04",
                                                   "grpo.max_completion_length=8", f"grpo.share_prompt={share}")
    assert (objective.shared_mask is not None) == share
    objective.accelerator = ONE_PROCESS
    moved_from_reference(model)  # else the KL term has no gradient
    generator = torch.Generator()

    def sampled(model, prompt_ids, n, length, *args, **kwargs):
        completions = [torch.randint(5, 60, (int(torch.randint(2, length + 1, (), generator=generator)),),
                                     generator=generator).tolist() for _ in range(len(prompt_ids) * n)]
        return fixed_rollout([p for p in prompt_ids for _ in range(n)], completions, 0)

    monkeypatch.setattr("ftune.eval.generation.sample_completions", sampled)
    monkeypatch.setattr("ftune.train.objectives.grpo.score", length_rewards)
    batch = next(iter(loader))
    halves = [{"prompts": batch["prompts"][rows], "prompt_ids": batch["prompt_ids"][rows],
               "columns": {name: values[rows] for name, values in batch["columns"].items()}}
              for rows in (slice(0, 4), slice(4, 8))]
    grads = []
    for step in ([batch], halves):
        generator.manual_seed(0)  # the same completions, drawn in the same order
        step = objective.prepare_step(model, step, step=1)
        model.zero_grad()
        total = sum(objective.count(b) for b in step)
        for b in step:
            (objective.loss(model, b)["loss"] / total).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(grad.abs().sum() > 0 for grad in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5, msg=name)


def length_rewards(funcs, weights, prompts, completions, columns, ids):
    """Each completion's length as its reward (random tokens earn the shipped rewards' 0 alike: no advantage)."""
    rewards = torch.tensor([float(len(tokens)) for tokens in ids])
    return rewards, rewards.unsqueeze(1).repeat(1, len(funcs))


def moved_from_reference(model) -> None:
    """Move every LoRA B off its zero start, so the policy differs from the reference (the adapter off)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.add_(0.05)


def test_a_group_in_one_row_scores_and_trains_as_its_completions_in_their_own_rows():
    """Log-probs and gradients equal in both layouts; a cut completion, masked out, takes no place in its row."""
    torch.manual_seed(0)  # the adapter's random start
    objective, model, _ = objective_and_model("grpo.num_generations=3", "grpo.mask_truncated_completions=true")
    assert objective.shared_mask == "sdpa" and objective.describe()["prompt"].startswith("once per group")
    moved_from_reference(model)
    prompts = [[1, 20, 21, 22, 23, 24]] * 3 + [[1, 30]] * 3
    completions = [[40, 41, 42], [43], [44, 45, 46, 47], [50, 51], [52, 53, 54, 55], [56]]
    rollout = fixed_rollout(prompts, completions, objective.tokenizer.pad_token_id)
    rollout.truncated[4] = True  # reached the limit: masked out
    shared = objective.training_batch(model, rollout)
    objective.shared_mask = None
    rows = objective.training_batch(model, rollout)
    assert shared["input_ids"].shape == (2, 6 + 3 + 1 + 4) and rows["input_ids"].shape == (6, 6 + 4)
    weights = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    logps, grads = [], []
    for batch in (shared, rows):
        model.zero_grad()
        per_token = on_completions(batch, objective.logps.per_token(model, batch))
        (per_token * weights).sum().backward()
        logps.append(per_token.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    learned = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]])
    assert torch.equal(shared["loss_mask"], learned) and torch.equal(logps[0] != 0, learned.bool())
    torch.testing.assert_close(logps[0], logps[1], rtol=1e-5, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, grad in grads[1].items():  # fp32 sums of other shapes: equal to 1e-4 of the largest gradient
        torch.testing.assert_close(grads[0][name], grad, rtol=0, atol=1e-4 * grad.abs().max().item(), msg=name)


def test_grpo_share_prompt_false_keeps_a_row_per_completion_and_the_table_says_why():
    objective, _, _ = objective_and_model("grpo.share_prompt=false", "pref.share_prompt=true")
    assert objective.shared_mask is None
    assert objective.describe()["prompt"] == "repeated for each completion (grpo.share_prompt=false)"


ONE_PROCESS = type("One", (), {"unwrap_model": staticmethod(lambda m: m), "num_processes": 1})()


def test_later_iterations_train_on_the_same_rollouts_with_ratios_to_their_sampling_logps(monkeypatch):
    """Two iterations: step 2 trains on step 1's completions, with the ratio to the log-probs they were sampled with.

    Step 1 samples and saves those log-probs (its ratio is 1); step 2 samples nothing, and its ratio moved with
    the weights.
    """
    objective, model, loader = objective_and_model("grpo.num_iterations=2", "grpo.num_generations=2")
    objective.accelerator = ONE_PROCESS
    calls = []

    def sampled(model, prompt_ids, n, length, *args, **kwargs):
        calls.append(len(prompt_ids))
        rows = [p for p in prompt_ids for _ in range(n)]
        return fixed_rollout(rows, [[5 + i, 6, 7][: 1 + i % 3] for i in range(len(rows))], 0)

    monkeypatch.setattr("ftune.eval.generation.sample_completions", sampled)
    batches = iter(loader)
    first = objective.prepare_step(model, [next(batches)], step=1)[0]
    with torch.no_grad():
        torch.testing.assert_close(first["old_logps"], on_completions(first, objective.logps.per_token(model, first)),
                                   rtol=0, atol=0)
    moved_from_reference(model)
    second = objective.prepare_step(model, [next(batches)], step=2)[0]
    assert len(calls) == 1 and second is first
    with torch.no_grad():
        ratio = (on_completions(second, objective.logps.per_token(model, second)) - second["old_logps"]).exp()
    labelled = second["loss_mask"].bool()
    assert not torch.allclose(ratio[labelled], torch.ones_like(ratio[labelled]))


def test_a_run_with_two_iterations_samples_every_other_step_and_checkpoints_its_rollouts(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["train", *FAST, "trainer.max_steps=4", "trainer.save_every=3", "grpo.num_iterations=2",
                 f"output_dir={run_dir}"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [(row["reward"], row["completion_length"]) for row in rows if "loss" in row]
    assert rewards[0] == rewards[1] and rewards[2] == rewards[3]
    assert (run_dir / "checkpoints" / "step-3" / "grpo_rollouts_0.pt").is_file()


REWARDS = '''
SEEN = []

def column_reward(prompts, completions, tense, person, **kwargs):
    """1 for each completion that came with its prompt's columns."""
    return [1.0 if isinstance(t, str) and isinstance(p, str) else 0.0 for t, p in zip(tense, person)]

def raising_reward(prompts, completions, **kwargs):
    raise KeyError("no such verb")

def short_reward(prompts, completions, **kwargs):
    return [1.0]
'''


def test_a_users_reward_file_outside_the_checkout_trains_and_sees_the_columns(tmp_path, monkeypatch):
    (tmp_path / "rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["train", *FAST, "trainer.max_steps=2", "grpo.reward_funcs=[./rewards.py:column_reward]",
                 f"output_dir={run_dir}"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["reward_column_reward"] for row in rows if "loss" in row] == [1.0, 1.0]


@pytest.mark.parametrize("spec, code, said", [
    ("./missing.py:fn", 2, "grpo.reward_funcs: './missing.py:fn': no file"),
    ("./rewards.py:nothing", 2, "has no attribute 'nothing'"),
    ("./rewards.py:raising_reward", 1, "reward function raising_reward (./rewards.py:raising_reward) raised KeyError"),
    ("./rewards.py:short_reward", 1, "returned 1 rewards for 4 completions"),
])
def test_each_reward_error_is_one_line(tmp_path, monkeypatch, capsys, spec, code, said):
    (tmp_path / "rewards.py").write_text(REWARDS)
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    assert main(["train", *FAST, "trainer.max_steps=2", f"grpo.reward_funcs=[{spec}]", f"output_dir={run_dir}"]) == code
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("ftune: error:"))
    assert said in line and "Traceback" not in err
    if code == 2:  # refused before any model loads: nothing written
        assert not run_dir.exists()
    else:  # stopped in the first step, after a checkpoint of the start to resume from
        assert (run_dir / "checkpoints" / "step-0").is_dir()


@pytest.mark.slow
@pytest.mark.parametrize("iterations, kill_after", [(1, 2), (2, 3)])
def test_a_killed_run_resumes_exactly(tmp_path, iterations, kill_after):
    """With two iterations, killed after step 3: step 4 trains on step 3's completions, read from the checkpoint."""
    run = [*FAST, "trainer.max_steps=4", f"trainer.save_every={kill_after}", f"grpo.num_iterations={iterations}"]
    straight = tmp_path / "straight"
    assert main(["train", *run, f"output_dir={straight}"]) == 0
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "ftune", "train", *run, f"output_dir={killed}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = killed / "checkpoints" / f"step-{kill_after}" / "train_state.json"
    while not state.exists():
        assert process.poll() is None, process.stderr.read()
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert main(["train", *run, f"output_dir={killed}", "resume=auto"]) == 0
    expected, resumed = (load_file(d / "final" / "adapter_model.safetensors") for d in (straight, killed))
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
def test_the_shipped_recipe_raises_the_mean_reward(tmp_path):
    """`recipe=tiny_grpo`: the mean reward of the last five steps at least 0.3 above that of the first five."""
    run_dir = tmp_path / "run"
    assert main(["train", "recipe=tiny_grpo", f"output_dir={run_dir}"]) == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rewards = [row["reward"] for row in rows if "loss" in row]
    assert sum(rewards[-5:]) / 5 - sum(rewards[:5]) / 5 >= 0.3
    assert {"rewards.png", "completion_length.png"} <= {p.name for p in (run_dir / "plots").iterdir()}
