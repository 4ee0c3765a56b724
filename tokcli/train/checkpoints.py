"""Run folders, checkpoints and the metrics log of a training run.

A checkpoint (``<run>/checkpoints/step-XXXXXXX/``, written to a temporary folder and renamed) holds one
``<name>.safetensors`` per network of the objective (``model``, ``disc``, ...), ``ema.safetensors`` and
``state.pt``: ``step``, ``optimizers`` (name -> state), ``objective`` (its ``state_dict``), ``rng`` (every rank's
python / numpy / torch / CUDA states), ``data``, ``model_args``, ``recipe``; loadable with ``weights_only=True``.

Checkpoints written before objectives existed (``opt_g`` / ``opt_d`` / ``lecam`` at the top level of state.pt) still
resume: ``opt_g`` is the model's optimizer, ``opt_d`` the discriminator's, and the objective reads its state from the
top level.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokcli.core.atomic import atomic_write_text, remove_stale_temps, temp_dir
from tokcli.core.distributed import gather_objects
from tokcli.errors import TokError, TokUsageError
from tokcli.train.recipe import Recipe

CKPT_PREFIX = "step-"
STATE_FORMAT = 2
LEGACY_OPTIMIZERS = {"model": "opt_g", "disc": "opt_d"}


# --- random state ---------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"bit_generator": np_state["bit_generator"], "key": np_state["state"]["key"].tolist(),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }


def set_rng_state(s: dict[str, Any]) -> None:
    v, internal, gauss = s["python"]
    random.setstate((v, tuple(internal), gauss))
    n = s["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": np.asarray(n["key"], dtype=np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])


# --- folders --------------------------------------------------------------------------------------------------
def checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith(CKPT_PREFIX) and (p / "state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CKPT_PREFIX):]))


def resolve_dirs(r: Recipe, output_dir, resume) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from or None)."""
    if resume is None:
        run_dir = Path(output_dir) if output_dir else Path("runs") / r.name
        if checkpoints(run_dir):
            raise TokUsageError(f"{run_dir} already holds checkpoints: pass --resume {run_dir} to continue that run "
                                f"or choose another --output")
        return run_dir, None
    p = Path(resume)
    if (p / "state.pt").is_file():
        ckpt = p
        default_run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    else:
        found = checkpoints(p)
        if not found:
            raise TokUsageError(f"--resume {p}: no checkpoint there (expected {p}/checkpoints/{CKPT_PREFIX}XXXXXXX/ "
                                f"or a checkpoint folder holding state.pt)")
        ckpt, default_run = found[-1], p
    return (Path(output_dir) if output_dir else default_run), ckpt


def read_state(ckpt: Path) -> dict[str, Any]:
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)


# --- save / load ----------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Path, st) -> Path:
    """Write ``st`` (a :class:`tokcli.train.loop.TrainState`) at its step; every rank takes part (RNG states)."""
    from safetensors.torch import save_file

    r, obj = st.recipe, st.objective
    states = gather_objects(rng_state())
    final = run_dir / "checkpoints" / f"{CKPT_PREFIX}{st.step:07d}"
    if st.rank == 0:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(final.parent)
        tmp = temp_dir(final.parent, final.name)
        try:
            for name, net in obj.networks.items():
                save_file(_cpu(net.state_dict()), str(tmp / f"{name}.safetensors"))
            if st.ema is not None:
                save_file(_cpu(st.ema.state_dict()), str(tmp / "ema.safetensors"))
            torch.save({
                "format": STATE_FORMAT,
                "step": st.step,
                "optimizers": {name: opt.state_dict() for name, opt in st.optimizers.items()},
                "objective": obj.state_dict(),
                "rng": states,
                "data": {"seed": st.data.seed, "next_micro_batch": st.step * r.optim.grad_accum,
                         "num_images": len(st.data), "world_size": st.world},
                "model_args": obj.model_args(),
                "recipe": r.to_dict(),
            }, tmp / "state.pt")
            if final.exists():  # a re-run of the same step: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if r.run.keep_checkpoints:
            for old in checkpoints(run_dir)[:-r.run.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
    if st.world > 1:
        torch.distributed.barrier()
    return final


def _cpu(sd: dict) -> dict:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def load_checkpoint(ckpt: Path, saved: dict, st) -> int:
    """Load weights, EMA, optimizers, the objective's state and this rank's RNG into ``st``; returns the step."""
    from safetensors.torch import load_file

    obj, dev = st.objective, str(st.objective.device)
    for name, net in obj.networks.items():
        f = ckpt / f"{name}.safetensors"
        if not f.is_file():
            why = " (the recipe has loss.gan_weight > 0)" if name == "disc" else ""
            raise TokError(f"{ckpt} has no {f.name} but this run trains a {name!r} network{why}")
        net.load_state_dict(load_file(str(f), device=dev), strict=True)
    if st.ema is not None:
        if not (ckpt / "ema.safetensors").is_file():
            raise TokError(f"{ckpt} has no ema.safetensors but the recipe asks for an EMA (optim.ema_decay)")
        st.ema.load_state_dict(load_file(str(ckpt / "ema.safetensors"), device=dev))
    opts = saved.get("optimizers") or {k: saved.get(old) for k, old in LEGACY_OPTIMIZERS.items()}
    for name, opt in st.optimizers.items():
        if opts.get(name) is None:
            raise TokError(f"{ckpt} holds no optimizer state for the {name!r} network")
        opt.load_state_dict(opts[name])
    obj.load_state_dict(saved["objective"] if "objective" in saved else saved)
    states = saved["rng"]
    if len(states) != st.world:
        print(f"warning: {ckpt} was written by {len(states)} rank(s), this run has {st.world}; data order and random "
              f"streams will differ from an uninterrupted run", file=sys.stderr)
    set_rng_state(states[st.rank if st.rank < len(states) else 0])
    return int(saved["step"])


# --- metrics.jsonl --------------------------------------------------------------------------------------------
def append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics log. A last line that does not parse (the append was cut short: power loss, a full
    disk) is dropped with a warning on stderr; a bad line before the last is a TokError naming the line."""
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    numbered = [(i, ln) for i, ln in enumerate(lines, 1) if ln.strip()]
    rows = []
    for pos, (i, ln) in enumerate(numbered):
        try:
            row = json.loads(ln)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if pos < len(numbered) - 1:
                raise TokError(f"{path}: line {i} is not a JSON record ({e}); fix or delete that line") from None
            print(f"warning: {path}: dropped line {i}, a partly written record (the run was cut off while "
                  f"logging)", file=sys.stderr)
            continue
        rows.append(row)
    return rows


def last_logged_losses(path: Path, step: int) -> dict[str, float]:
    rows = [r for r in read_metrics(path) if r.get("step") == step]
    return {k: float(v) for k, v in rows[-1].items() if k not in ("step", "lr", "images_per_s")} if rows else {}


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (they are about to be redone) and a partly written
    last line; the file is rewritten atomically."""
    if not path.is_file():
        return
    keep = [row for row in read_metrics(path) if _step_of(row) <= step]
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in keep))


def _step_of(row: dict) -> int:
    s = row.get("step", 0)
    return s if isinstance(s, int) and not isinstance(s, bool) else 0
