"""User-facing errors: each one becomes a single line on stderr and a documented exit code.

`cli.main` catches `FtuneError` and prints `ftune: error: <message> (<hint>)`; nothing below the
CLI prints errors or calls `sys.exit` itself.
"""

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_GUARD = 3
EXIT_INTERRUPTED = 130


class FtuneError(Exception):
    """An error the user can fix; `message` says where and what, `hint` how to fix it."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self):
        """Pickle with the message and hint (data workers send errors back to the main process)."""
        return type(self), (self.message, self.hint)

    def one_line(self) -> str:
        """The message as the CLI prints it, folded onto one line."""
        text = self.message if not self.hint else f"{self.message} ({self.hint})"
        return " ".join(text.split())


class ConfigError(FtuneError):
    """A bad recipe, override or key; exit 2."""

    exit_code = EXIT_BAD_INPUT


class DataError(FtuneError):
    """Bad input data: a file, line or record that is not what a format expects; exit 2."""

    exit_code = EXIT_BAD_INPUT


class ResourceError(FtuneError):
    """A missing model, checkpoint, adapter or path the user named; exit 2."""

    exit_code = EXIT_BAD_INPUT


class ParityError(FtuneError):
    """An export that does not compute what the trained model does (`ftune export`); nothing was written; exit 1."""


class GuardStop(FtuneError):
    """A run stopped by a guard the user asked for (e.g. non-finite loss), after saving; exit 3."""

    exit_code = EXIT_GUARD


class StepError(FtuneError):
    """User code that failed inside a training step (a reward function), after a checkpoint to resume from; exit 1."""


def first_line(err: BaseException, limit: int) -> str:
    """A library's exception as part of one of ftune's lines: its message's first line, at most `limit` characters.

    The class name stands in for an empty message. Used where ftune reports what a model's own code raised on a
    probe or a trace (a traceback would break the one-line rule).
    """
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
