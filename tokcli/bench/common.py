"""Small pieces shared by the `tok bench` drivers: warnings, torchrun shards, the model record."""

from __future__ import annotations

import sys


def warn(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"warning: {msg}", file=sys.stderr)


def input_positions(items) -> dict[str, int]:
    """key -> index in the whole input list (the order results are reported in, whichever rank scored them)."""
    return {it.key: i for i, it in enumerate(items)}


def gather_errors(errors: list, positions: dict[str, int]) -> list:
    """Every rank's per-input failures (key, reason), in input order."""
    from tokcli.core.distributed import gather_objects

    return sorted((e for part in gather_objects(errors) for e in part), key=lambda e: positions.get(e[0], -1))


def model_record(tok) -> dict:
    return {"name": tok.name, "family": tok.family, "sha256": tok.sha256, "source": tok.source}
