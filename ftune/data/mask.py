"""The label value that cross-entropy ignores: every token the model must not learn carries it."""

IGNORE_INDEX = -100
