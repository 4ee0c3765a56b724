"""Checks every model's ``model_args`` share (a config.json is a file from anywhere): no unknown keys, the required
ones present, defaults filled in, numbers of the right kind. ``label`` names the model in the one-line errors
("unknown SiT model_args bogus (known: ...)")."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from tokcli.errors import TokError


def complete(label: str, args: Mapping[str, Any], required: Sequence[str], defaults: Mapping[str, Any]
             ) -> dict[str, Any]:
    """``args`` with the defaults filled in (None counts as not given), required keys first; a TokError for an
    unknown or a missing key."""
    known = (*required, *defaults)
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise TokError(f"unknown {label} model_args {', '.join(unknown)} (known: {', '.join(known)})")
    missing = [k for k in required if args.get(k) is None]
    if missing:
        raise TokError(f"{label} model_args need {', '.join(missing)}")
    given = {k: v for k, v in args.items() if v is not None}
    return {**{k: given[k] for k in required}, **defaults, **given}


def integer(label: str, key: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (a float that is a whole number is accepted; a bool is not)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or int(value) != value or value < minimum):
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise TokError(f"{label} model_args {key} must be {what}, got {value!r}")
    return int(value)


def non_negative(label: str, key: str, value: Any) -> float:
    """``value`` as a finite float >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise TokError(f"{label} model_args {key} must be a non-negative number, got {value!r}")
    return float(value)
