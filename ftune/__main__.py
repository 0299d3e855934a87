"""`python -m ftune` is the same entry point as the `ftune` console script."""

from ftune.cli import entry

entry()
