"""The parity report every export carries: each check's figure, its tolerance and whether it passed.

A report is a plain dict (it goes into `export_report.json` and the model card as it is):
`{"runtime": "transformers 5.x", "checks": {name: {"value", "tolerance", "passed", ...}}}`.
`require_passed` turns any failed check into the error that stops the export before its output is renamed
into place.
"""

import math

from ftune.errors import ParityError

PROBE_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say walked in the present."},
    {"role": "assistant", "content": "walk"},
    {"role": "user", "content": "And ran?"},
    {"role": "assistant", "content": "run"},
]
"""A two-turn conversation rendered by the exported chat template and by the template training used."""


def within(value: float, tolerance: float, **detail) -> dict:
    """A measured check: passes when `value` <= `tolerance` (a NaN never passes)."""
    return {"value": value, "tolerance": tolerance, "passed": not math.isnan(value) and value <= tolerance, **detail}


def identical(actual, expected, **detail) -> dict:
    """An exact check: passes when `actual == expected`; a failure keeps both for the report."""
    if actual == expected:
        return {"value": "identical", "tolerance": None, "passed": True, **detail}
    return {"value": "different", "tolerance": None, "passed": False, "actual": actual, "expected": expected,
            **detail}


def require_passed(parity: dict, what: str) -> None:
    """Raise `ParityError` naming every failed check of `parity` (with its figure and tolerance).

    Raises:
        ParityError: at least one check failed.
    """
    failed = {name: check for name, check in parity["checks"].items() if not check["passed"]}
    if failed:
        figures = "; ".join(f"{name}: {describe(check)}" for name, check in failed.items())
        raise ParityError(f"{what} failed its parity check against the trained model ({figures}); nothing was "
                          "written", "report it with the command line; try another quant or format=hf")


def describe(check: dict) -> str:
    """A failed check in a few words: the figure and its tolerance, or what differed."""
    if check.get("tolerance") is not None:
        return f"{check['value']:.3g} > {check['tolerance']:.3g}"
    if "actual" in check:
        return f"got {str(check['actual'])[:80]!r}, expected {str(check['expected'])[:80]!r}"
    return str(check["value"])
