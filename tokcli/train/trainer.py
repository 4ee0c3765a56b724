"""The public entry of ``tok train``: :func:`train` (the loop is ``loop.py``, what it optimises the recipe's
objective, ``objective.py``; checkpoints ``checkpoints.py``; the exported folder ``export.py``)."""

from __future__ import annotations

from tokcli.train.checkpoints import CKPT_PREFIX
from tokcli.train.loop import lr_multiplier, train
from tokcli.train.objective import Objective

__all__ = ["CKPT_PREFIX", "Objective", "lr_multiplier", "train"]
