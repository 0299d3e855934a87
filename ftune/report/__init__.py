"""What a run shows and writes: console, metrics, plots."""
