"""Loss and perplexity of a model on a data loader: one implementation for training-time eval and `ftune eval`."""

import math

import torch

from ftune.train.losses import UNFUSED, StepLoss, learned_token_count


@torch.no_grad()
def evaluate_loss(model, loader, accelerator, max_batches: int = -1, loss: StepLoss = UNFUSED) -> dict[str, float]:
    """Mean loss per learned token over the loader (all processes), and its perplexity.

    Training passes its own (chunked) cross-entropy as `loss`, so evaluation holds no full logits either.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device, dtype=torch.long)
    for index, batch in enumerate(loader):
        if index == max_batches:
            break
        loss_sum += loss(model, batch)["loss"]
        count += learned_token_count(batch["labels"])
    model.train(was_training)
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    loss = (loss_sum / count.clamp(min=1)).item()
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": int(count.item())}
