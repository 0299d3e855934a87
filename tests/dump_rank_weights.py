"""`ftune train`'s build, loop and final save, after which every rank writes the weights it holds (test helper).

Run by tests/test_distributed.py under `accelerate launch`; each rank writes `<output_dir>/rank-<i>.safetensors`
next to the run's final/. `ftune train` saves only the main process's copy, so this is how the test sees the
other replica: had DDP not synchronised gradients, the ranks (which train on different batches) would differ.
"""

import sys
from pathlib import Path

from safetensors.torch import save_file

from ftune.commands.train import build_training
from ftune.config.compose import load_run_config
from ftune.train.artefacts import save_final
from ftune.train.loop import fit


def main(overrides: list[str]) -> None:
    cfg, resolved = load_run_config(overrides)
    run, tokenizer, _ = build_training(cfg, resolved)
    fit(run)
    save_final(run, tokenizer, cfg.data)
    run.log.close()
    model = run.accelerator.unwrap_model(run.model)
    weights = {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}
    save_file(weights, Path(cfg.output_dir) / f"rank-{run.accelerator.process_index}.safetensors")
    run.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1:])
