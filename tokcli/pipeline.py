"""The library side of `tok encode / decode / reconstruct`: images -> tokens -> images, batched, with every
failure reported. The CLI only parses options and calls these functions.

Determinism: tokens do not depend on batch size; stochastic decoders draw each image's noise from its own
generator seeded with ``seed + index`` (index = position in the token file), so results replay exactly whatever the
batching.

Run settings are arguments, never attributes set on the model: ``precision`` ("fp32" / "tf32" / "bf16", autocast
around the model calls: tokcli/core/device.py; None leaves the process's maths settings alone, e.g. when a caller
has set them) is applied here and recorded in the token header;
``sampler`` (e.g. ``{"steps": 8, "cfg": 2.0}``) goes to ``model.decode(..., **sampler)``, which refuses keywords its
family does not take.

Outputs: a token file is written atomically; the PNGs of `decode` / `reconstruct` are written into a hidden staging
folder inside the output folder and moved into place only when the run succeeded (with ``skip_errors``: with the
good images), so a run that fails halfway leaves the previous outputs as they were. ``check_output_file`` /
``check_output_folder`` find an unwritable output before a model is loaded.

``sample_posterior`` (families whose ``encode`` takes it, e.g. CODA) encodes with a posterior sample; image i is
seeded with ``seed + i`` (its index in the token file), recorded as ``tokens.extra.posterior = "sample"`` and
``tokens.extra.posterior_seed`` in the header.
"""

from __future__ import annotations

import datetime as _dt
import inspect
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from tokcli.errors import TokError, TokUsageError
from tokcli.version import __version__


@dataclass
class Result:
    keys: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    tokens: np.ndarray | None = None
    upscaled: int = 0  # images smaller than half the crop size (enlarged more than 2x)
    image_size: int | None = None  # the crop size of an encode / reconstruct


def check_output_file(output: str | Path) -> None:
    """Before any work: the token file ``output`` can be written (``-``, stdout, always can)."""
    from tokcli.core.atomic import check_writable_file

    if str(output) != "-":
        check_writable_file(output)


def check_output_folder(out_dir: str | Path) -> None:
    """Before any work: the PNG folder ``out_dir`` exists (created) and takes files; not an existing file."""
    from tokcli.core.atomic import check_writable_folder

    check_writable_folder(out_dir)


def check_posterior(model, sample_posterior: bool) -> bool:
    """Whether to sample the posterior; a family whose ``encode`` has no ``sample_posterior`` refuses it (exit 2)."""
    if not sample_posterior:
        return False
    if "sample_posterior" not in inspect.signature(model.encode).parameters:
        raise TokUsageError(f"the {model.family} family has no posterior sampling (--sample-posterior is for "
                            "families whose encode samples a VAE posterior, e.g. coda)")
    return True


def image_size_for(model, image_size: int | None) -> int:
    from tokcli.core.images import check_image_size

    check_image_size(image_size)
    pre = model.preprocess
    size = int(image_size or pre["image_size"])
    if model.spec.downsample is None and size != int(pre["image_size"]):  # 1-D tokens: one size only
        raise TokUsageError(f"--image-size {size}: {model.name or 'the model'} takes only {pre['image_size']}x"
                            f"{pre['image_size']} images (its tokens do not scale with the image)")
    m = int(pre.get("multiple_of", 1))
    if size % m:
        raise TokUsageError(f"--image-size {size} is not a multiple of {m} (what {model.name or 'the model'} needs)")
    return size


def model_ref(name_or_path: str | None, model) -> str:
    """How a token file names its model: the registry name, or local-dir:<absolute path>."""
    from tokcli.core.registry import DEFAULT_MODEL

    if getattr(model, "ref", ""):  # what resolution actually picked (a registry name is not shadowed by a folder)
        return model.ref
    ref = name_or_path or DEFAULT_MODEL
    p = Path(ref[len("local-dir:"):] if ref.startswith("local-dir:") else ref).expanduser()
    if ref.startswith("local-dir:") or p.is_dir():
        return "local-dir:" + str(p.resolve())
    return ref


def apply_precision(model, precision: str | None) -> str:
    """Set the maths precision for this run (None: keep the current settings) and return the one in effect on the
    model's device ("tf32" only on CUDA with TF32 allowed; "bf16" on any device)."""
    from tokcli.core.device import precision_in_effect, set_precision

    if precision is not None:
        set_precision(precision)
    return precision_in_effect(model.device)


def check_sampler(model, sampler: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sampler keywords for ``model.decode``, refused up front (before any image is read or written) when the
    family does not take them (:class:`TokUsageError`, exit code 2)."""
    sampler = {k: v for k, v in (sampler or {}).items() if v is not None}
    model.sampler_kwargs(sampler)
    return sampler


LATENT_DTYPES = ("float32", "float16")


def check_latent_dtype(model, latent_dtype: str | None) -> str | None:
    """The storage dtype of latent tokens ("float32" when None), refused up front for a model whose tokens are
    not latents (:class:`TokUsageError`); None for such a model when nothing was asked."""
    if model.spec.kind != "latents":
        if latent_dtype is not None:
            raise TokUsageError(f"--latent-dtype applies to latent tokens; {model.name} writes {model.spec.kind}")
        return None
    latent_dtype = latent_dtype or "float32"
    if latent_dtype not in LATENT_DTYPES:
        raise TokUsageError(f"--latent-dtype must be one of {', '.join(LATENT_DTYPES)}, got {latent_dtype!r}")
    return latent_dtype


def stored_tokens(tok, latent_dtype: str | None) -> np.ndarray:
    """The tokens as the token file stores them (latents rounded to ``latent_dtype``)."""
    arr = tok.cpu().numpy()
    return arr.astype(latent_dtype, copy=False) if latent_dtype else arr


def token_header(model, ref: str, size: int, precision: str = "fp32", posterior_seed: int | None = None,
                 latent_dtype: str | None = None) -> dict[str, Any]:
    """The token file header; ``posterior_seed`` (a sampled encode) is recorded in ``tokens.extra``,
    ``latent_dtype`` (latent tokens) as ``latent_dtype``."""
    spec = model.spec.to_dict()
    spec["shape"] = list(model.spec.shape_for(size, size))
    if posterior_seed is not None:
        spec["extra"] = {**(spec.get("extra") or {}), "posterior": "sample", "posterior_seed": int(posterior_seed)}
    pre = dict(model.preprocess)
    pre["image_size"] = size
    return {
        "model": ref,
        "model_sha256": model.sha256,
        "family": model.family,
        "tokens": spec,
        "preprocess": pre,
        "precision": precision,
        **({"memory_format": model.memory_format} if getattr(model, "conv_layout", False) else {}),
        **({"compiled": True} if getattr(model, "compiled", False) else {}),
        **({"latent_dtype": latent_dtype} if latent_dtype else {}),
        "tok_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def check_header(model, header: dict[str, Any], *, force: bool = False) -> int:
    """Refuse a token file made by another model; return the image size it was encoded at."""
    fam = header.get("family")
    if fam != model.family:
        raise TokError(f"token file was made by a {fam!r} model, not {model.family!r} ({model.name})")
    t = header.get("tokens", {})
    pre = header.get("preprocess", {})
    if not isinstance(t, dict) or not isinstance(pre, dict):
        raise TokError("token file header: tokens and preprocess must be JSON objects")
    mine = model.spec
    for k in ("kind", "codebook_size", "bits", "latent_dim", "downsample"):
        if t.get(k) != getattr(mine, k):
            raise TokError(f"token file spec {k}={t.get(k)!r} does not match model {model.name} ({getattr(mine, k)!r})")
    extra = t.get("extra") if isinstance(t.get("extra"), dict) else {}
    for k in model.header_checked_extra:  # token-spec extras the decoder depends on (e.g. SoftVQ's normalisation)
        if extra.get(k) != mine.extra.get(k):
            raise TokError(f"token file {k}={extra.get(k)!r} does not match model {model.name} ({mine.extra.get(k)!r})")
    try:
        size = int(pre.get("image_size", model.preprocess["image_size"]))
    except (TypeError, ValueError):
        raise TokError(f"token file header: preprocess.image_size {pre.get('image_size')!r} is not a number") from None
    if list(t.get("shape", [])) != list(mine.shape_for(size, size)):
        raise TokError(f"token shape {t.get('shape')} does not match model {model.name} at {size}px "
                       f"({list(mine.shape_for(size, size))})")
    sha = header.get("model_sha256")
    if not force and sha and model.sha256 and sha != model.sha256:
        raise TokError(f"token file was made by model weights {sha[:12]}…, but {model.name} has {model.sha256[:12]}… "
                       "(a different checkpoint; --force decodes anyway)")
    return size


def progress_bar(total: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=quiet, dynamic_ncols=True, leave=False)


@dataclass
class _Posterior:
    """How `encode` draws: the mean (``sample=False``) or a posterior sample seeded ``seed + position``."""
    sample: bool = False
    seed: int = 0


def _encode_batches(model, items, size, batch_size, workers, skip_errors, quiet, res: Result,
                    posterior: _Posterior | None = None, positions: dict[str, int] | None = None):
    """Yield (keys, uint8 images, token tensor) for each batch of good images."""
    import torch

    from tokcli.core.device import as_float32, autocast
    from tokcli.core.images import iter_batches, to_tensor

    bar = progress_bar(len(items), "encode", quiet)
    stats: dict[str, int] = {}
    done = 0
    try:
        for keys, imgs in iter_batches(items, size, batch_size, skip_errors=skip_errors, errors=res.errors,
                                       workers=workers, stats=stats):
            x = to_tensor(imgs).to(model.device)
            with torch.inference_mode(), autocast(model.device):
                if posterior is not None and posterior.sample:
                    where = [positions[k] for k in keys] if positions is not None else range(done, done + len(keys))
                    tok = model.encode(x, sample_posterior=True, seed=[posterior.seed + p for p in where])
                else:
                    tok = model.encode(x)
            done += len(keys)
            yield keys, imgs, as_float32(tok)
            bar.update(len(keys))
        bar.update(len(items) - bar.n)
    finally:
        bar.close()
        res.upscaled = stats.get("upscaled", 0)


def encode(model, items, *, ref: str, output: str | Path, image_size: int | None = None, batch_size: int = 8,
           workers: int = 0, skip_errors: bool = False, quiet: bool = False, precision: str | None = None,
           sample_posterior: bool = False, seed: int = 0, latent_dtype: str | None = None,
           labels: str | None = None) -> Result:
    """Encode images to a token file written atomically at ``output`` (``-`` = stdout). ``sample_posterior``:
    a posterior sample instead of the mean, image i seeded with ``seed + i`` (families that have a posterior).
    ``latent_dtype``: "float16" stores latent tokens at half the bytes (rounded; default "float32").
    ``labels``: "folder" (the keys' class folders) or a labels file (``tokcli.core.labels.resolve_labels``).
    A sharded set (``-o DIR/``, torchrun) is :func:`tokcli.encode_set.encode_set`."""
    from tokcli.core.labels import resolve_labels
    from tokcli.core.tokens import write_token_file

    label_ids, label_header = resolve_labels(labels, [it.key for it in items])

    size = image_size_for(model, image_size)
    posterior = _Posterior(check_posterior(model, sample_posterior), int(seed))
    latent_dtype = check_latent_dtype(model, latent_dtype)
    check_output_file(output)
    precision = apply_precision(model, precision)
    res = Result(image_size=size)
    chunks = []
    for keys, _, tok in _encode_batches(model, items, size, batch_size, workers, skip_errors, quiet, res, posterior):
        res.keys.extend(keys)
        chunks.append(stored_tokens(tok, latent_dtype))
    if not res.keys:
        raise TokError("no image could be encoded" + (f" ({len(res.errors)} failed)" if res.errors else ""))
    res.tokens = np.concatenate(chunks)
    kind = model.spec.kind
    header = token_header(model, ref, size, precision, posterior.seed if posterior.sample else None, latent_dtype)
    if label_header is not None:
        header["labels"] = label_header
    where = {it.key: i for i, it in enumerate(items)}
    write_token_file(output, header=header, keys=res.keys, **{kind: res.tokens},
                     labels=None if label_ids is None else label_ids[[where[k] for k in res.keys]])
    return res


def decode_batch(model, tokens: np.ndarray, start: int, seed: int, positions=None, sampler=None):
    """Decode one batch; stochastic decoders seed image i with ``seed + start + i`` (its index in the file), or
    with ``seed + positions[i]`` when the caller knows the images' global positions (sharded runs). ``sampler``:
    keywords for ``model.decode``."""
    import torch

    from tokcli.core.device import as_float32, autocast

    t = torch.from_numpy(np.ascontiguousarray(tokens))
    t = t.long() if model.spec.kind == "indices" else t.float()
    t = t.to(model.device)
    with torch.inference_mode(), autocast(model.device):
        if model.stochastic_decoder:
            seeds = ([seed + p for p in positions] if positions is not None else
                     [seed + start + i for i in range(len(tokens))])
            return as_float32(model.decode(t, seed=seeds, **(sampler or {})))
        return as_float32(model.decode(t, **(sampler or {})))


class Stage:
    """The PNGs of one run, written under a hidden ``.tok-stage.tmp-<pid>-<random>`` folder inside ``out_dir`` and
    moved to their places by :meth:`commit`; :meth:`abort` removes them (the previous outputs stay as they were)."""

    def __init__(self, out_dir: Path):
        from tokcli.core.atomic import make_folder, remove_stale_temps, temp_dir

        self.out_dir = out_dir
        self.created = not out_dir.exists()
        check_output_folder(out_dir)
        make_folder(out_dir)
        remove_stale_temps(out_dir, again=True)
        self.dir = temp_dir(out_dir, "tok-stage")
        self.moves: list[tuple[Path, Path]] = []

    def write(self, img: np.ndarray, dest: Path) -> None:
        from tokcli.core.images import save_png

        staged = self.dir / dest.relative_to(self.out_dir)
        save_png(img, staged, shown_as=dest)
        self.moves.append((staged, dest))

    def commit(self) -> None:
        from tokcli.core.atomic import os_error_message

        for staged, dest in self.moves:
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, dest)
            except OSError as e:
                raise TokError(os_error_message(e, dest)) from None
        shutil.rmtree(self.dir, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.created:
            try:
                os.rmdir(self.out_dir)  # only if empty: never remove what someone else put there meanwhile
            except OSError:
                pass


def write_pngs(stage: Stage, keys: Iterable[str], images, res: Result) -> None:
    from tokcli.core.images import output_path, to_uint8

    arr = to_uint8(images)
    for key, img in zip(keys, arr):
        dest = output_path(stage.out_dir, key)
        stage.write(img, dest)
        res.written.append(dest)


def _batches(src, model, force: bool, out_dir: Path, batch_size: int):
    """(keys, token rows) of ``batch_size`` images from the shards of ``src`` in order: batches span shard borders,
    so a set decodes in exactly the batches of the same tokens in one file. Each shard's header is checked, and two
    keys that would write one PNG are refused before their shard is decoded."""
    from tokcli.core.images import output_path

    seen: dict[Path, str] = {}
    keys: list[str] = []
    rows: list[np.ndarray] = []
    for tf in src.files():
        if src.shards > 1:
            check_header(model, tf.header, force=force)  # every shard, not only the manifest, names the model
        for key in tf.keys:
            p = output_path(out_dir, key)
            if seen.setdefault(p, key) != key:
                raise TokError(f"inputs {seen[p]!r} and {key!r} would both be written to {p}")
        pos = 0
        while pos < len(tf):
            take = min(batch_size - len(keys), len(tf) - pos)
            keys.extend(tf.keys[pos:pos + take])
            rows.append(tf.array[pos:pos + take])
            pos += take
            if len(keys) == batch_size:
                yield keys, np.concatenate(rows)
                keys, rows = [], []
    if keys:
        yield keys, np.concatenate(rows)


def decode(model, tokens, out_dir: str | Path, *, batch_size: int = 8, seed: int = 0, force: bool = False,
           quiet: bool = False, precision: str | None = None, sampler: Mapping[str, Any] | None = None) -> Result:
    """Decode a token file (a :class:`TokenFile` already read) or a set (a :class:`TokenSource` from
    :func:`tokcli.core.token_set.open_tokens`, read one shard at a time) into PNGs under ``out_dir``, mirroring the
    keys; the PNGs appear only when every image decoded. Image i of the file or set is seeded ``seed + i``."""
    from tokcli.core.token_set import as_source

    src = as_source(tokens)
    check_header(model, src.header, force=force)
    sampler = check_sampler(model, sampler)
    apply_precision(model, precision)
    res = Result()
    out_dir = Path(out_dir)
    stage = Stage(out_dir)
    bar = progress_bar(len(src), "decode", quiet)
    try:
        for keys, rows in _batches(src, model, force, out_dir, batch_size):
            imgs = decode_batch(model, rows, len(res.keys), seed, sampler=sampler)
            write_pngs(stage, keys, imgs, res)
            res.keys.extend(keys)
            bar.update(len(imgs))
        stage.commit()
    except BaseException:
        stage.abort()
        raise
    finally:
        bar.close()
    return res


def reconstruct(model, items, out_dir: str | Path, *, image_size: int | None = None, batch_size: int = 8,
                workers: int = 0, seed: int = 0, skip_errors: bool = False, quiet: bool = False,
                on_batch=None, positions: dict[str, int] | None = None, precision: str | None = None,
                sampler: Mapping[str, Any] | None = None, sample_posterior: bool = False,
                latent_dtype: str | None = None) -> Result:
    """encode -> decode through exactly the code path of `tok encode` + `tok decode` (bit-identical results).

    ``on_batch(keys, originals, recon, tokens)`` is called for every batch with the uint8 originals after the crop
    [B, H, W, 3], the decoder output (float tensor [B, 3, H, W] in [-1, 1]) and the tokens (numpy): metrics stream
    through it, so memory does not grow with the number of images. ``out_dir=None`` writes no PNGs; otherwise they
    are moved into ``out_dir`` when the run succeeded (a failed run leaves the previous PNGs as they were).
    ``positions`` (key -> index in the whole input list) seeds stochastic decoders by global position, so a shard
    of a distributed run draws the same noise as a single process (when no input fails). ``precision``,
    ``sampler``, ``sample_posterior`` (seeded like the decoder) and ``latent_dtype`` (the tokens are rounded as a
    token file would store them) as in :func:`encode` / :func:`decode`.
    """
    size = image_size_for(model, image_size)
    sampler = check_sampler(model, sampler)
    posterior = _Posterior(check_posterior(model, sample_posterior), int(seed))
    latent_dtype = check_latent_dtype(model, latent_dtype)
    apply_precision(model, precision)
    res = Result(image_size=size)
    stage = None
    if out_dir is not None:
        from tokcli.core.images import output_paths

        output_paths(Path(out_dir), [it.key for it in items])  # two inputs that would write one PNG: refuse up front
        stage = Stage(Path(out_dir))
    try:
        for keys, imgs, tok in _encode_batches(model, items, size, batch_size, workers, skip_errors, quiet, res,
                                               posterior, positions):
            start = len(res.keys)
            res.keys.extend(keys)
            stored = stored_tokens(tok, latent_dtype)
            recon = decode_batch(model, stored, start, seed,
                                  [positions[k] for k in keys] if positions is not None else None, sampler)
            if stage is not None:
                write_pngs(stage, keys, recon, res)
            if on_batch is not None:
                on_batch(keys, imgs, recon, stored)
        if not res.keys:
            raise TokError("no image could be reconstructed" + (f" ({len(res.errors)} failed)" if res.errors else ""))
        if stage is not None:
            stage.commit()
    except BaseException:
        if stage is not None:
            stage.abort()
        raise
    return res
