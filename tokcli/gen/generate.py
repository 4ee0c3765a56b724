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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

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
    """Sample, decode and write (see the module docstring); ``sampler``: keywords for ``gen.sample``."""
    from tokcli import pipeline
    from tokcli.core.tokens import write_token_file

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TokUsageError(f"--batch-size must be at least 1, got {batch_size!r}")
    opts = gen.sampler_kwargs(dict(sampler or {}))
    gen.check_labels(labels)
    gen.check_tokenizer(tokenizer)
    check_outputs(out_dir, keys, tokens_out)
    precision = pipeline.apply_precision(tokenizer, "fp32")
    res = GenerateResult(keys=list(keys), labels=list(labels))
    stage = pipeline.Stage(Path(out_dir))
    bar = pipeline.progress_bar(len(keys), "generate", quiet)
    chunks = []
    try:
        for s in range(0, len(keys), batch_size):
            y = labels[s:s + batch_size]
            samples = gen.sample(y, seed=[seed + s + i for i in range(len(y))], **opts)
            stored = pipeline.stored_tokens(gen.tokens_for(samples, tokenizer), "float32"
                                            if tokenizer.spec.kind == "latents" else None)
            chunks.append(stored)
            imgs = pipeline.decode_batch(tokenizer, stored, s, 0)
            pipeline.write_pngs(stage, keys[s:s + len(y)], imgs, res)
            bar.update(len(y))
        res.tokens = np.concatenate(chunks)
        if tokens_out is not None:
            header = token_header(gen, tokenizer, seed, opts, precision)
            write_token_file(tokens_out, header=header, keys=keys, labels=np.asarray(labels, dtype=np.int64),
                             **{tokenizer.spec.kind: res.tokens})
        stage.commit()
    except BaseException:
        stage.abort()
        raise
    finally:
        bar.close()
    return res
