"""Converting official checkpoints into tok model folders (the library side of `tok convert`).

Each family's converter does the tensor mapping; this module decides where the checkpoint comes from (a file, or
the Hub / Hugging Face cache for a registry name) and where the folder goes. A release may span several Hub files
(``ModelEntry.extra_hub_files``, e.g. CODA's VAE + quantizer + base VAE in two repos): `tok convert NAME` fetches them
all and hands the family converter their paths as ``files`` (role -> path).
"""

from __future__ import annotations

import os
from pathlib import Path

from tokcli.core.atomic import check_overwrite
from tokcli.core.checkpoint import ModelFolder
from tokcli.core.registry import converted_dir, get_entry, get_family
from tokcli.errors import MissingWeightsError, TokError, TokUsageError


def fetch_release(entry) -> dict[str, Path]:
    """Every file of a registry entry's official release (:meth:`ModelEntry.release_files`), from the Hugging Face
    cache or downloaded when online (``HF_HUB_OFFLINE`` / ``HF_HUB_CACHE`` / ``HF_ENDPOINT`` read now). Returns
    role -> local path (``checkpoint`` is the main file). The cache is looked in first; a file that is not there is
    downloaded only after a short connect probe of the Hub (:func:`~tokcli.core.registry.hub_unreachable`), so an
    offline machine fails at once, not after huggingface_hub's retries. All files are tried before failing, so that
    one :class:`MissingWeightsError` line names every missing file, its repo, and the ``hf download`` commands."""
    from huggingface_hub import hf_hub_download

    from tokcli.core.registry import hf_endpoint, hf_env, hub_unreachable

    cache, offline = hf_env()
    found: dict[str, Path] = {}
    missing, todo = [], []
    for f in entry.release_files():
        try:
            found[f.role] = Path(hf_hub_download(f.repo, f.filename, revision=f.revision, cache_dir=cache,
                                                 local_files_only=True))
        except Exception as e:  # noqa: BLE001 - not cached (or a bad id): the Hub below, unless offline
            (missing if offline else todo).append((f, type(e).__name__))
    unreachable = hub_unreachable() if todo else None
    for f, why in todo:
        if unreachable:
            missing.append((f, unreachable))
            continue
        try:
            found[f.role] = Path(hf_hub_download(f.repo, f.filename, revision=f.revision, cache_dir=cache,
                                                 endpoint=hf_endpoint()))
        except Exception as e:  # noqa: BLE001 - missing / gated / network: reported together below
            missing.append((f, type(e).__name__))
    if missing:
        raise MissingWeightsError(_missing_release_message(entry, missing, offline))
    return found


def _missing_release_message(entry, missing: list, offline: bool) -> str:
    """One line: which files are missing (repo:filename), why, the `hf download` commands, the local alternative."""
    n = len(missing)
    if offline:
        why = f"HF_HUB_OFFLINE is set and {'it is' if n == 1 else 'they are'} not in the Hugging Face cache"
    else:
        why = f"{'it' if n == 1 else 'they'} could not be downloaded (" + \
            ", ".join(sorted({err for _, err in missing})) + ")"
    groups: dict[tuple[str, str | None], list[str]] = {}
    for f, _ in missing:
        groups.setdefault((f.repo, f.revision), []).append(f.filename)
    cmds = " and ".join(f"`hf download {repo} {' '.join(names)}{' --revision ' + rev if rev else ''}`"
                        for (repo, rev), names in groups.items())
    what = missing[0][0].spec if n == 1 else f"{n} files: " + ", ".join(f.spec for f, _ in missing)
    where = os.environ.get("HF_HUB_CACHE") or "~/.cache/huggingface/hub"
    return (f"{entry.name} needs {what}, but {why}; get {'it' if n == 1 else 'them'} with {cmds} (fills {where}) "
            f"or convert local copies with {entry.local_convert_hint()}")


def fetch_official(entry) -> Path:
    """Path of a registry entry's official checkpoint (its main file); see :func:`fetch_release`."""
    return fetch_release(entry)["checkpoint"]


def convert(source: str, *, output: str | None = None, family: str | None = None, config: str | None = None,
            as_model: str | None = None, name: str | None = None, overwrite: bool = False,
            tokenizer_out: str | None = None) -> ModelFolder:
    src = Path(source).expanduser()
    model_args = None
    prov: dict = {}
    extra_files: dict[str, Path] = {}
    if config and not Path(config).expanduser().exists():
        raise TokError(f"no such file or folder: {config}")
    if src.is_dir() and not (family or as_model):
        raise TokUsageError(f"{source} is a folder; give --family or --as with it (an official release folder, e.g. "
                            f"SoftVQ's), or pass a checkpoint file or a registry name")
    if src.is_file() or src.is_dir():
        if as_model:
            entry = get_entry(as_model)
            family = family or entry.family
            if family != entry.family:
                raise TokUsageError(f"--family {family} contradicts --as {as_model} (a {entry.family} model)")
            model_args = dict(entry.model_args)
            name = name or entry.name
            dest = Path(output) if output else converted_dir(entry.name)
            prov["registry_name"] = entry.name
        else:
            if not family:
                raise TokUsageError("converting a file needs --family (e.g. --family wetok) or --as REGISTRY_NAME")
            if not config and not src.is_dir():
                raise TokUsageError("converting a file needs its official --config YAML (or --as REGISTRY_NAME)")
            if not output:
                raise TokUsageError("converting a file needs -o/--output DIR (or --as REGISTRY_NAME)")
            dest = Path(output)
        ckpt = src
        prov["source"] = str(src.resolve())
    else:
        if "/" in source or "\\" in source or source.endswith((".ckpt", ".pth", ".pt", ".safetensors")):
            raise TokError(f"no such file or folder: {source}")
        entry = get_entry(source)
        if not entry.hub_repo:
            if entry.shipped:
                raise TokUsageError(f"{source} has no official checkpoint to convert (it is a tok-native model)")
            raise TokError(f"{source} cannot be fetched as one file: {entry.notes}")
        family = entry.family
        model_args = dict(entry.model_args)
        name = name or entry.name
        dest = check_overwrite(output or converted_dir(entry.name), overwrite)  # before any download
        fetched = fetch_release(entry)
        ckpt = fetched.pop("checkpoint")
        extra_files = fetched
        prov.update(source=f"hf-hub:{entry.hub_repo}/{entry.hub_filename}" +
                    (f"@{entry.hub_revision}" if entry.hub_revision else ""), registry_name=entry.name,
                    license=entry.license, paper=entry.paper)
        if extra_files:
            prov["hub_files"] = {f.role: f"hf-hub:{f.repo}/{f.filename}" + (f"@{f.revision}" if f.revision else "")
                                 for f in entry.release_files()[1:]}
    converter = get_family(family).converter("checkpoint")
    # only families whose releases span several files take `files` (role -> path); WeTok's converter does not
    kw = {"files": extra_files} if extra_files else {}
    if tokenizer_out is not None:
        import inspect

        if "tokenizer_out" not in inspect.signature(converter).parameters:
            raise TokUsageError(f"--tokenizer-out is for generator checkpoints that carry their tokenizer (wetok_ar); "
                                f"a {family} checkpoint has none")
        kw["tokenizer_out"] = tokenizer_out
    check_overwrite(dest, overwrite)
    return converter(ckpt, config, dest, name=name, model_args=model_args, provenance=prov, overwrite=overwrite, **kw)
