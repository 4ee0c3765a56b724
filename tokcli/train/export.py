"""The end of a run: the trained model written as a model folder (``<run>/model``) with its card and ``training``
record. Nothing here knows a family: the objective picks the model to save (``export_model``, which may calibrate
its arguments) and describes its loss; the family adds its ``card`` sections; the data module describes the data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tokcli.train.recipe import Recipe


def export_run(model_dir: Path, st, state: dict[str, torch.Tensor], last: dict[str, float], weights: str) -> None:
    """Write the model with the weights ``state`` (``weights``: "ema" or "raw") into ``model_dir``."""
    r, obj = st.recipe, st.objective
    model = obj.export_model(state, st.data)
    info = st.data.summary()
    training = training_record(st, info, last, weights)
    card = model_card(st, model, info, last, weights, training["global_batch"])
    model.save_folder(model_dir, name=r.name, state_dict=state, card=card, extra={"training": training},
                      provenance={"source": "trained with tok train", "recipe": r.source, "license": r.model.license},
                      overwrite=True)


def objective_name(r: Recipe) -> str:
    from tokcli.core.registry import get_family

    return r.model.objective or next(iter(get_family(r.model.family).objectives))


def training_record(st, info: dict[str, Any], last: dict[str, float], weights: str) -> dict[str, Any]:
    r, o = st.recipe, st.recipe.optim
    return {
        "recipe_file": r.source, "recipe": r.to_dict(), "objective": objective_name(r), "steps": st.step,
        "global_batch": r.data.batch_size * o.grad_accum * st.world,
        "final_losses": {k: round(v, 6) for k, v in last.items()}, "init_from": r.model.init_from,
        "weights": weights, "ema_decay": o.ema_decay, "data": info, **st.objective.training_record(),
    }


def optimizer_text(r: Recipe) -> str:
    o = r.optim
    text = (f"{'AdamW' if o.optimizer == 'adamw' else 'Adam'} lr {o.lr} betas {tuple(o.betas)} weight decay "
            f"{o.weight_decay}, {o.lr_schedule} schedule")
    if o.warmup_steps or o.lr_schedule != "constant":
        text += f" (warm-up {o.warmup_steps} steps, min lr {o.min_lr})"
    return text


def model_card(st, model, info: dict[str, Any], last: dict[str, float], weights: str, global_batch: int) -> str:
    from tokcli.core.registry import get_family

    r, obj, o = st.recipe, st.objective, st.recipe.optim
    fam = get_family(r.model.family)
    what = "image tokenizer" if fam.kind == "tokenizer" else fam.kind
    describe = obj.describe()
    ema_text = f"EMA (decay {o.ema_decay}{', warm-up (1 + t) / (10 + t)' if o.ema_warmup else ''})"
    losses = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
    lines = [f"recipe: `{r.source}`", f"objective: `{objective_name(r)}`",
             f"steps: {st.step}, global batch {global_batch}, {optimizer_text(r)}",
             f"loss: {' + '.join(obj.loss_terms()) or 'n/a'}", *obj.card_lines(),
             f"weights: {ema_text if weights == 'ema' else 'raw (no EMA)'}", f"final losses: {losses or 'n/a'}"]
    sections = {**obj.card_sections(model), **dict(fam.card)}
    text = (f"# {r.name}\n\nA `{r.model.family}` {what} trained with `tok train`"
            f"{f' ({describe})' if describe else ''}.\n\n"
            f"## Training data\n\n{st.data.card_text(info)}\n\n"
            f"## Training\n\n" + "".join(f"- {ln}\n" for ln in lines) + "\n")
    text += "".join(f"## {title}\n\n{body.strip()}\n\n" for title, body in sections.items())
    loader = "load" if fam.kind == "tokenizer" else "load_generator"
    return text + (f"Load it with `tokcli.{loader}(\"local-dir:PATH_OF_THIS_FOLDER\")`; `config.json` holds the "
                   "full recipe under `training`.\n")
