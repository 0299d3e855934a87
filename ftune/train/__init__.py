"""The training loop and what it needs: losses, optimizer, checkpoints, evaluation."""
