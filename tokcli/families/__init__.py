"""The built-in families, one package each. Importing a family package registers it
(``FAMILY = register_family(Family(...))`` in its ``__init__``); :func:`load_all` imports every package found here,
then the modules named in ``$TOK_FAMILIES`` (comma-separated; families that live outside tok), then the installed
``tokcli.families`` entry points. Nothing else in tok lists the families: removing a package removes the family.
Families never import each other."""

from __future__ import annotations

import importlib
import os
import pkgutil

from tokcli.errors import TokError

ENTRY_POINT_GROUP = "tokcli.families"


def load_all() -> None:
    for m in pkgutil.iter_modules(__path__):
        if m.ispkg:
            importlib.import_module(f"{__name__}.{m.name}")
    for name in filter(None, (s.strip() for s in os.environ.get("TOK_FAMILIES", "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise TokError(f"cannot import the family module {name!r} named in $TOK_FAMILIES: {e}") from None
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
