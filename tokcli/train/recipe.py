"""Training recipes: TOML files read with tomllib into a strict dataclass schema.

Every key is known and typed: an unknown key or a value of the wrong type is a TokUsageError that names the key
and the file. Relative paths (``data.roots``, ``model.init_from``) are taken relative to the working folder,
which is the repository root for the shipped recipes.

    [model]  family, name, license, objective (one of the family's training objectives; default its first),
             model_args = {...}, init_from (a model to start from, a registry name or a folder: the stage-1 model
             for generative_decoder_stage2, or the frozen base for families that adapt one, e.g. CODA on kl-tiny),
             generative_decoder_stage2
    [data]   roots (folders, image files or .txt file lists), crop_size, random_resize = [lo, hi], batch_size,
             workers, hflip, cache, recursive; generators: tokens (a token file or set), tokenizer and
             crops_per_image (encode random crops of the roots into ``tokens`` first, once: train/token_data.py)
    [loss]   shared by every family: l1_weight, l2_weight, perceptual ("lpips-vgg" | "lpips-vgg-random" | "none"),
             perceptual_weight, gan_weight (0 = no GAN), disc_start, lecam_weight, lecam_decay, disc_ndf, disc_layers;
             plus the keys of the family's own section (``Family.recipe``, a dataclass extending LossSection, in
             ``families/<name>/objective.py``): wetok entropy_mode, entropy_weight, commitment_weight; kl kl_weight;
             coda vq_weight, entropy_weight. A key of another family's section is refused.
    [optim]  optimizer ("adam" | "adamw"), lr, disc_lr, betas, weight_decay, grad_accum, max_steps, ema_decay
             (0 = off), ema_warmup, grad_clip, lr_schedule ("constant" | "cosine": from lr to min_lr over max_steps
             after warmup_steps of linear warm-up), warmup_steps, min_lr
    [run]    seed, log_every, ckpt_every, sample_every, keep_checkpoints, device, precision ("fp32" | "bf16"),
             deterministic

See recipes/README.md for what each shipped recipe is for.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokcli.errors import TokError, TokUsageError

PERCEPTUAL_CHOICES = ("lpips-vgg", "lpips-vgg-random", "none")
PRECISIONS = ("fp32", "bf16")
LR_SCHEDULES = ("constant", "cosine")
OPTIMIZERS = ("adam", "adamw")


@dataclass
class ModelSection:
    family: str
    name: str = ""
    license: str = "other"  # licence recorded in the exported model folder
    objective: str | None = None  # a name of the family's objectives (default: its first)
    model_args: dict = field(default_factory=dict)
    init_from: str | None = None  # stage 2: the stage-1 model; CODA: the base KL VAE (registry name or folder)
    generative_decoder_stage2: bool = False


@dataclass
class DataSection:
    roots: list[str] = field(default_factory=list)  # images; a generator's token data may need none
    crop_size: int = 256
    # The short side is resized to crop_size * s, s uniform in [lo, hi], before the random crop.
    # [1.0, 1.0] is the official "Resize(256) + RandomCrop(256)".
    random_resize: list[float] = field(default_factory=lambda: [1.0, 1.0])
    batch_size: int = 8  # per device (per rank); global batch = batch_size * world_size * grad_accum
    workers: int = 0  # DataLoader worker processes (0 = build batches in the training process)
    hflip: bool = False
    cache: bool = True  # decode every image once and keep it in memory (small data sets only)
    recursive: bool = True
    # token data (generators, ``tokcli/train/token_data.py``): the token file / set to train on; with
    # ``tokenizer``, the cache that random crops of ``roots`` are encoded into first (once)
    tokens: str | None = None
    tokenizer: str | None = None  # a model name or folder: encode crops_per_image random crops of every image
    crops_per_image: int = 16


@dataclass
class LossSection:
    """The [loss] keys every family shares (reconstruction, perceptual, GAN). A family's section extends it."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual: str = "lpips-vgg"
    perceptual_weight: float = 1.0
    gan_weight: float = 0.1  # 0 turns the discriminator off
    disc_start: int = 0
    lecam_weight: float = 0.05
    lecam_decay: float = 0.999
    disc_ndf: int = 64
    disc_layers: int = 3

    def problems(self) -> list[str]:
        """What is wrong with the values (empty when nothing); subclasses add theirs to ``super().problems()``."""
        out = [f"'loss.{f.name}' must be >= 0, got {getattr(self, f.name)}" for f in dataclasses.fields(self)
               if f.name.endswith("_weight") and getattr(self, f.name) < 0]
        if self.perceptual not in PERCEPTUAL_CHOICES:
            out.append(f"'loss.perceptual' must be one of {', '.join(PERCEPTUAL_CHOICES)}, got {self.perceptual!r}")
        if not 0 <= self.lecam_decay < 1:
            out.append(f"'loss.lecam_decay' must be in [0, 1), got {self.lecam_decay}")
        if not (self.disc_start >= 0 and self.disc_ndf > 0 and self.disc_layers > 0):
            out.append("'loss.disc_start' must be >= 0 and 'loss.disc_ndf', 'loss.disc_layers' positive")
        return out


@dataclass
class OptimSection:
    optimizer: str = "adam"
    lr: float = 1e-4
    disc_lr: float | None = None  # default: lr
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_steps: int = 1000
    ema_decay: float = 0.999  # 0 = no EMA (the raw weights are exported)
    ema_warmup: bool = False  # decay min(ema_decay, (1 + t) / (10 + t)) at update t (LitEma's rule; short runs)
    grad_clip: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0


@dataclass
class RunSection:
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 1000
    sample_every: int | None = None
    keep_checkpoints: int = 0  # 0 = keep every checkpoint, N = keep the newest N
    device: str = "auto"
    precision: str = "fp32"
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on GPU)


@dataclass
class Recipe:
    model: ModelSection
    data: DataSection
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    run: RunSection = field(default_factory=RunSection)
    source: str = "<dict>"

    @property
    def stage2(self) -> bool:
        return self.model.generative_decoder_stage2

    @property
    def name(self) -> str:
        if self.model.name:
            return self.model.name
        return Path(self.source).stem if self.source != "<dict>" else self.model.family

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (no None values: TOML has no null), without the source path."""
        def clean(d):
            return {k: v for k, v in d.items() if v is not None}
        return {s: clean(dataclasses.asdict(getattr(self, s))) for s in _SECTIONS}


_SECTIONS = {"model": ModelSection, "data": DataSection, "loss": LossSection, "optim": OptimSection,
             "run": RunSection}


# ------------------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------------------
def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a TOML recipe file."""
    p = Path(path)
    if not p.exists():
        raise TokError(f"no such file or folder: {path}")
    try:
        raw = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise TokUsageError(f"cannot read recipe {p}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise TokUsageError(f"{p} is not valid TOML: {e}") from None
    return recipe_from_dict(raw, source=str(p))


def recipe_from_dict(raw: dict[str, Any], *, source: str = "<dict>") -> Recipe:
    """Validate a recipe given as nested dicts (what tomllib returns). The [loss] section's schema is the one of
    the family named in [model] (``Family.recipe``; the shared :class:`LossSection` when it has none)."""
    if not isinstance(raw, dict):
        raise TokUsageError(f"{source}: a recipe is a table of sections")
    unknown = [k for k in raw if k not in _SECTIONS]
    if unknown:
        raise TokUsageError(f"{source}: unknown section [{unknown[0]}] (known: {', '.join(_SECTIONS)})")
    for required in ("model", "data"):
        if required not in raw:
            raise TokUsageError(f"{source}: the [{required}] section is required")
    model = _section(ModelSection, raw["model"], "model", source)
    classes = {**_SECTIONS, "loss": loss_section_class(model, source)}
    sections = {name: model if name == "model" else _section(cls, raw.get(name, {}), name, source, model.family)
                for name, cls in classes.items()}
    r = Recipe(**sections, source=source)
    _check_values(r)
    return r


def loss_section_class(m: ModelSection, source: str = "<dict>") -> type:
    """The [loss] dataclass of the recipe's family (checks that the family and ``model.objective`` exist)."""
    from tokcli.core.registry import get_family

    if not m.family:
        raise TokUsageError(f"{source}: 'model.family' must name a model family")
    try:
        fam = get_family(m.family)
    except TokError as e:
        raise TokUsageError(f"{source}: 'model.family': {e}") from None
    if m.objective is not None and m.objective not in fam.objectives:
        raise TokUsageError(f"{source}: 'model.objective' {m.objective!r} is not an objective of the {m.family} "
                            f"family (it has: {', '.join(fam.objectives) or 'none'})")
    return fam.recipe_section() or LossSection


def _owners_of_loss_key(key: str, family: str) -> list[str]:
    """The other families whose [loss] section has ``key`` (for the error message)."""
    from tokcli.core.registry import families

    owners = []
    for name, fam in sorted(families().items()):
        if name != family and fam.recipe:
            try:
                cls = fam.recipe_section()
            except Exception:  # noqa: BLE001 - a broken foreign family must not hide the real error
                continue
            if key in {f.name for f in dataclasses.fields(cls)}:
                owners.append(name)
    return owners


def _section(cls, table: Any, name: str, source: str, family: str = ""):
    if not isinstance(table, dict):
        raise TokUsageError(f"{source}: [{name}] must be a table, got {type(table).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in table.items():
        if key not in fields:
            owners = _owners_of_loss_key(key, family) if name == "loss" and family else []
            if owners:
                raise TokUsageError(f"{source}: key '{key}' in [{name}] is a key of the {' and '.join(owners)} "
                                    f"famil{'ies' if len(owners) > 1 else 'y'}, not of {family} (its [{name}] keys: "
                                    f"{', '.join(fields)})")
            raise TokUsageError(f"{source}: unknown key '{key}' in [{name}] (known: {', '.join(fields)})")
        kwargs[key] = _coerce(value, hints[key], f"{name}.{key}", source)
    for f in fields.values():
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise TokUsageError(f"{source}: [{name}] needs the key '{f.name}'")
    return cls(**kwargs)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str, source: str):
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    def bad():
        shown = repr(value) if len(repr(value)) < 60 else repr(value)[:57] + "..."
        return TokUsageError(f"{source}: '{key}' must be {_describe(tp)}, got {shown} ({type(value).__name__})")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner[0], key, source)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise bad()
        return [_coerce(v, item, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad()
        return dict(value)
    raise AssertionError(f"unsupported annotation {tp} for {key}")  # pragma: no cover


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _describe([a for a in typing.get_args(tp) if a is not type(None)][0])
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "a table"}.get(tp, _type_name(tp))


def _check_values(r: Recipe) -> None:
    src = r.source

    def need(ok: bool, msg: str):
        if not ok:
            raise TokUsageError(f"{src}: {msg}")

    m, d, lo, o, run = r.model, r.data, r.loss, r.optim, r.run
    if m.generative_decoder_stage2:
        need(bool(m.init_from), "'model.generative_decoder_stage2' needs 'model.init_from' (a stage-1 model folder)")
        need(not m.model_args, "'model.model_args' must be left out in stage 2: they come from 'model.init_from'")
    need(len(d.roots) > 0 or bool(d.tokens), "[data] needs the key 'roots', at least one folder, image or file "
                                             "list (or, for a generator, 'tokens': a token file)")
    need(not d.tokenizer or (bool(d.tokens) and len(d.roots) > 0),
         "'data.tokenizer' encodes the images of 'data.roots' into the token file 'data.tokens': set both")
    need(d.crops_per_image >= 1, f"'data.crops_per_image' must be >= 1, got {d.crops_per_image}")
    need(d.crop_size > 0, f"'data.crop_size' must be positive, got {d.crop_size}")
    need(len(d.random_resize) == 2 and 0 < d.random_resize[0] <= d.random_resize[1],
         f"'data.random_resize' must be [lo, hi] with 0 < lo <= hi, got {d.random_resize}")
    need(d.batch_size > 0, f"'data.batch_size' must be positive, got {d.batch_size}")
    need(d.workers >= 0, f"'data.workers' must be >= 0, got {d.workers}")
    for problem in lo.problems()[:1]:
        need(False, problem)
    need(o.lr > 0 and (o.disc_lr is None or o.disc_lr > 0), "'optim.lr' and 'optim.disc_lr' must be positive")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
         f"'optim.betas' must be two numbers in [0, 1), got {o.betas}")
    need(o.weight_decay >= 0, f"'optim.weight_decay' must be >= 0, got {o.weight_decay}")
    need(o.grad_accum >= 1, f"'optim.grad_accum' must be >= 1, got {o.grad_accum}")
    need(o.max_steps >= 1, f"'optim.max_steps' must be >= 1, got {o.max_steps}")
    need(0 <= o.ema_decay < 1, f"'optim.ema_decay' must be in [0, 1) (0 = off), got {o.ema_decay}")
    need(o.grad_clip is None or o.grad_clip > 0, f"'optim.grad_clip' must be positive, got {o.grad_clip}")
    need(o.optimizer in OPTIMIZERS, f"'optim.optimizer' must be one of {', '.join(OPTIMIZERS)}, got {o.optimizer!r}")
    need(o.warmup_steps >= 0 and 0 <= o.min_lr <= o.lr,
         "'optim.warmup_steps' must be >= 0 and 'optim.min_lr' in [0, lr]")
    need(o.lr_schedule in LR_SCHEDULES,
         f"'optim.lr_schedule' must be one of {', '.join(LR_SCHEDULES)}, got {o.lr_schedule!r}")
    need(run.log_every >= 1 and run.ckpt_every >= 1, "'run.log_every' and 'run.ckpt_every' must be >= 1")
    need(run.sample_every is None or run.sample_every >= 1, "'run.sample_every' must be >= 1")
    need(run.keep_checkpoints >= 0, f"'run.keep_checkpoints' must be >= 0, got {run.keep_checkpoints}")
    need(run.precision in PRECISIONS, f"'run.precision' must be one of {', '.join(PRECISIONS)}, "
                                      f"got {run.precision!r}")
