"""The library side of ``tok generate``: classes x n samples of a generator, decoded through its tokenizer into PNGs
(``class{c:04d}/{i:05d}.png``) and optionally a token file that ``tok decode`` reads.

- Sample j of the run (class-major order: every sample of the first class, then the next) is seeded with
  ``seed + j``, so the images do not depend on ``batch_size``.
- The tokenizer is the one the generator's folder names (``tokenizer.name``, resolved like any model name; its
  ``tokenizer.sha256``, when recorded, must match the weights found), or the one given explicitly.
- Decoding goes through exactly the code path of ``tok decode`` (``pipeline``), and the token file stores the very
  tokens that were decoded (float32 latents for SiT), with ``labels``; so ``tok decode`` of it writes the same PNGs.
- The PNGs are staged and moved into place only when the whole run succeeded (as ``tok decode`` does); progress on
  stderr.
- torchrun (WORLD_SIZE > 1, :func:`run`): the batches of the one-process plan (samples ``[k b, (k + 1) b)``) are
  dealt round-robin to the ranks (:func:`batch_spans`), so each batch, its seeds and hence its bytes are those of a
  single process; every rank stages its own PNGs, all ranks commit only when every rank succeeded, and rank 0 alone
  writes ``--tokens-out`` (the tokens gathered in sample order).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from tokcli.core.distributed import all_ok, in_turn
from tokcli.errors import TokError, TokUsageError


@dataclass
class GenerateResult:
    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    tokens: np.ndarray | None = None


def parse_classes(spec: str | None, num_classes: int) -> list[int]:
    """``all``, one id or a comma list (``1,2,3``) -> class ids, each checked against ``num_classes``."""
    if spec is None or not str(spec).strip():
        raise TokUsageError("--class is required: class ids (e.g. 207 or 1,2,3) or all")
    spec = str(spec).strip()
    if spec.lower() == "all":
        return list(range(num_classes))
    out = []
    for part in spec.split(","):
        try:
            c = int(part.strip())
        except ValueError:
            raise TokUsageError(f"--class takes class ids (e.g. 207 or 1,2,3) or all, got {spec!r}") from None
        if not 0 <= c < num_classes:
            raise TokUsageError(f"class {c} is out of range: the generator has classes 0..{num_classes - 1}")
        out.append(c)
    if len(set(out)) != len(out):
        raise TokUsageError(f"--class {spec} names a class twice (use -n for more samples per class)")
    return out


def plan(classes: list[int], n: int) -> tuple[list[str], list[int]]:
    """(keys, labels) of the run: ``class{c:04d}/{i:05d}`` for every class, i < n."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise TokUsageError(f"-n (samples per class) must be at least 1, got {n!r}")
    keys = [f"class{c:04d}/{i:05d}" for c in classes for i in range(n)]
    return keys, [c for c in classes for _ in range(n)]


def plan_total(classes: list[int], total: int) -> tuple[list[str], list[int]]:
    """(keys, labels) of ``total`` samples split evenly over ``classes`` (the first ``total % len(classes)``
    classes get one more); class-major order and the keys of :func:`plan`."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise TokUsageError(f"--num-samples must be at least 1, got {total!r}")
    base, extra = divmod(total, len(classes))
    counts = [base + (i < extra) for i in range(len(classes))]
    keys = [f"class{c:04d}/{i:05d}" for c, k in zip(classes, counts) for i in range(k)]
    return keys, [c for c, k in zip(classes, counts) for _ in range(k)]


def batch_spans(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
    """This rank's batches ``(start, stop)`` of ``n`` samples: batch k (samples ``[k b, min((k + 1) b, n))``) goes
    to rank ``k % world``. Over all ranks every sample is in exactly one batch, the batches of one process."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TokUsageError(f"--batch-size must be at least 1, got {batch_size!r}")
    return [(s, min(s + batch_size, n)) for k, s in enumerate(range(0, n, batch_size)) if k % world == rank]


def world_info() -> tuple[int, int]:
    """(rank, world size) of the initialised torch.distributed group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sample_batch(gen, tokenizer, labels: list[int], start: int, stop: int, *, seed: int,
                 sampler: Mapping[str, Any]):
    """Samples ``start..stop-1`` of the run (sample j seeded ``seed + j``) as the stored tokens (what the token file
    keeps) and the decoded float images."""
    from tokcli import pipeline

    y = labels[start:stop]
    samples = gen.sample(y, seed=[seed + j for j in range(start, stop)], **sampler)
    stored = pipeline.stored_tokens(gen.tokens_for(samples, tokenizer), "float32"
                                    if tokenizer.spec.kind == "latents" else None)
    return stored, pipeline.decode_batch(tokenizer, stored, start, 0)


def load_tokenizer(gen, name: str | None = None, device: str = "cpu"):
    """The tokenizer ``gen`` decodes through: ``name`` if given, else the one its folder names (sha256-checked)."""
    import tokcli

    recorded = gen.tokenizer_ref
    want = name or gen.tokenizer_name
    if not want:
        raise TokUsageError(f"the generator {gen.name} records no tokenizer (no tokenizer.name in its config.json): "
                            "pass --tokenizer NAME")
    try:
        tok = tokcli.load(want, device=device)
    except TokError as e:
        raise type(e)(f"the generator {gen.name} decodes through the tokenizer {want}: {e}") from None
    sha = recorded.get("sha256")
    if name is None and sha and tok.sha256 and sha != tok.sha256:
        raise TokError(f"the generator {gen.name} was made for tokenizer weights {sha[:12]}…, but {want} has "
                       f"{tok.sha256[:12]}… (another checkpoint; --tokenizer {want} uses it anyway)")
    gen.check_tokenizer(tok)
    return tok


def token_header(gen, tokenizer, seed: int, sampler: Mapping[str, Any], precision: str) -> dict[str, Any]:
    """A token file header for ``tokenizer`` (what ``tok decode`` checks) plus a ``generator`` record."""
    from tokcli.pipeline import model_ref, token_header as tokenizer_header

    header = tokenizer_header(tokenizer, model_ref(None, tokenizer), tokenizer.image_size, precision)
    header["generator"] = {"model": gen.ref or gen.name, "model_sha256": gen.sha256, "family": gen.family,
                           "seed": int(seed), "sampler": dict(sampler), "seeding": "sample j: seed + j"}
    return header


def check_outputs(out_dir: str | Path, keys: list[str], tokens_out: str | Path | None) -> None:
    """Before any work: the PNG folder and the token file can be written, and every key names a file."""
    from tokcli.core.images import output_paths
    from tokcli.pipeline import check_output_file, check_output_folder

    check_output_folder(out_dir)
    output_paths(Path(out_dir), keys)
    if tokens_out is not None:
        if str(tokens_out) == "-":
            raise TokUsageError("--tokens-out needs a file name (stdout is not supported here)")
        check_output_file(tokens_out)


def generate(gen, tokenizer, keys: list[str], labels: list[int], out_dir: str | Path, *, seed: int = 0,
             batch_size: int = 8, sampler: Mapping[str, Any] | None = None, tokens_out: str | Path | None = None,
             quiet: bool = False) -> GenerateResult:
    """Sample, decode and write (see the module docstring); ``sampler``: keywords for ``gen.sample``. Inside an
    initialised torch.distributed group this rank does its batches (:func:`batch_spans`); ``written`` lists this
    rank's PNGs, ``tokens`` this rank's samples (all of them on rank 0 with ``tokens_out``)."""
    from tokcli import pipeline

    rank, world = world_info()
    spans = batch_spans(len(keys), batch_size, rank, world)
    opts = gen.sampler_kwargs(dict(sampler or {}))
    gen.check_labels(labels)
    gen.check_tokenizer(tokenizer)
    precision = pipeline.apply_precision(tokenizer, "fp32")
    res = GenerateResult(keys=list(keys), labels=list(labels))

    made: list = []

    def make_stage():
        check_outputs(out_dir, keys, tokens_out)
        made.append(pipeline.Stage(Path(out_dir)))

    try:
        in_turn(make_stage, rank, world)  # rank 0 makes the folder before the others look at it
    except BaseException:
        for st in made:
            st.abort()
        raise
    stage = made[0]
    bar = pipeline.progress_bar(sum(b - a for a, b in spans), "generate", quiet or rank != 0)
    chunks: list[tuple[int, np.ndarray]] = []
    try:
        failure = None
        try:
            for a, b in spans:
                stored, imgs = sample_batch(gen, tokenizer, labels, a, b, seed=seed, sampler=opts)
                chunks.append((a, stored))
                pipeline.write_pngs(stage, keys[a:b], imgs, res)
                bar.update(b - a)
        except Exception as e:  # noqa: BLE001 - re-raised by all_ok, after every rank has heard of it
            failure = e
        all_ok(failure, world)
        res.tokens = _tokens_in_order(chunks, world if tokens_out is not None else 1)
        failure = None
        if tokens_out is not None and rank == 0:
            try:
                _write_tokens(tokens_out, gen, tokenizer, seed, opts, precision, keys, labels, res.tokens)
            except Exception as e:  # noqa: BLE001
                failure = e
        all_ok(failure, world)  # no rank commits its PNGs unless the token file was written
        stage.commit()
    except BaseException:
        stage.abort()
        raise
    finally:
        bar.close()
    return res


def _tokens_in_order(chunks: list[tuple[int, np.ndarray]], world: int) -> np.ndarray | None:
    """The tokens of ``chunks`` ((start, array) per batch), gathered from every rank when ``world > 1``, in sample
    order (on every rank)."""
    from tokcli.core.distributed import gather_objects

    parts = [c for part in gather_objects(chunks) for c in part] if world > 1 else list(chunks)
    parts.sort(key=lambda c: c[0])
    return np.concatenate([c[1] for c in parts]) if parts else None


def _write_tokens(path, gen, tokenizer, seed, opts, precision, keys, labels, tokens) -> None:
    from tokcli.core.tokens import write_token_file

    header = token_header(gen, tokenizer, seed, opts, precision)
    write_token_file(path, header=header, keys=keys, labels=np.asarray(labels, dtype=np.int64),
                     **{tokenizer.spec.kind: tokens})


def run(model: str, out_dir: str | Path, *, classes: str | None, n: int = 1, sampler: Mapping[str, Any] | None = None,
        seed: int = 0, batch_size: int = 8, tokens_out: str | Path | None = None, tokenizer: str | None = None,
        device: str = "auto", quiet: bool = False) -> tuple[GenerateResult, Any, Any]:
    """``tok generate`` from names: load the generator (on this rank's device under torchrun, which starts the
    process group), plan ``classes`` x ``n``, generate. Returns (result, generator, tokenizer)."""
    import tokcli
    from tokcli.core.device import resolve_device, set_precision
    from tokcli.core.distributed import process_group

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        plan([], n)  # the one-line refusal of -n 0, before anything is loaded
    set_precision("fp32")
    with process_group(resolve_device(device)) as (rank, world, dev):
        gen = tokcli.load_generator(model, device=str(dev))
        keys, labels = plan(parse_classes(classes, gen.num_classes), n)
        opts = gen.sampler_kwargs(dict(sampler or {}))
        in_turn(lambda: check_outputs(out_dir, keys, tokens_out), rank, world)
        tok = load_tokenizer(gen, tokenizer, device=str(gen.device))
        res = generate(gen, tok, keys, labels, out_dir, seed=seed, batch_size=batch_size, sampler=opts,
                       tokens_out=tokens_out, quiet=quiet)
    return res, gen, tok
