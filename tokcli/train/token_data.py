"""Token data for training generators (data kind ``"tokens"``): micro-batches of ids and class labels from a token
file or sharded set (``tok encode`` output, ``[data] tokens = "codes.npz"``).

Batches: ``{"tokens": int64 [B, T] (each image's ids flattened in the file's order), "labels": int64 [B]}``; like the
image data (``data.py``), micro-batch m of rank r holds the global sample positions (m world + r) B .. + B - 1 of a
fresh permutation per epoch drawn from (seed, epoch): a pure function of (seed, micro-batch, rank), so resume is
exact. Labels: the file's ``labels`` (integers, or strings numbered in sorted order); class names from the header's
``labels.classes`` (``tok encode --labels folder``) when recorded. A file without labels gives label 0 everywhere
(``has_labels`` False: the objective refuses it for a conditional model).

Random crops, encoded once (``[data] tokenizer = "coda-tiny"`` with ``roots`` and ``tokens``): when the file
``tokens`` does not exist, every image of ``roots`` is cut ``crops_per_image`` times (``random_resize``, ``hflip``
and the crop at the tokenizer's image size = ``crop_size``; crop c of image i from a generator seeded
(seed, i, c)), encoded with the tokenizer (posterior mean) and written there as a token file whose header records
how (``crops``); images in class folders (every image of a root inside a sub-folder) get folder labels. An existing
file is used as it is when its ``crops`` record matches the recipe, else refused (delete it to re-encode).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from tokcli.errors import TokError, TokUsageError
from tokcli.train.recipe import DataSection

_PERM_TAG = 0x5EED_0003
_CROP_TAG = 0x5EED_0004


def crops_record(cfg: DataSection, seed: int) -> dict[str, Any]:
    """How the cached token file of random crops was made (compared on reuse)."""
    return {"tokenizer": cfg.tokenizer, "roots": list(cfg.roots), "crops_per_image": cfg.crops_per_image,
            "crop_size": cfg.crop_size, "random_resize": list(cfg.random_resize), "hflip": cfg.hflip,
            "seed": int(seed)}


def _crop_labels(keys: list[str]) -> tuple[np.ndarray | None, list[str] | None]:
    """Folder labels of the crops' source keys ("<root>/<class>/<file>") when every image is in a class folder."""
    from tokcli.core.labels import class_of, folder_classes, folder_labels

    inner = [k.split("/", 1)[1] for k in keys]
    if not inner or any(class_of(k) is None for k in inner):
        return None, None
    classes = folder_classes(inner)
    return folder_labels(inner, classes), classes


def encode_crops(cfg: DataSection, seed: int, *, device: str = "cpu") -> Path:
    """Encode random crops of ``cfg.roots`` with ``cfg.tokenizer`` into the token file ``cfg.tokens`` (see the
    module docstring); returns its path."""
    import tokcli
    from tokcli.core.images import load_item, to_tensor
    from tokcli.core.labels import labels_header
    from tokcli.core.tokens import write_token_file
    from tokcli.pipeline import model_ref, token_header
    from tokcli.train.data import collect_training_files, random_resized_crop
    from PIL import Image

    tok = tokcli.load(cfg.tokenizer, device=device)
    size = int(tok.preprocess["image_size"])
    if cfg.crop_size != size:
        raise TokUsageError(f"'data.crop_size' is {cfg.crop_size} but {cfg.tokenizer} takes {size} px images: set "
                            f"crop_size = {size}")
    items = collect_training_files(cfg.roots, cfg.recursive)
    if not items:
        raise TokError(f"no images under {', '.join(cfg.roots)} (data.roots)")
    keys, src, chunks = [], [], []
    lo, hi = cfg.random_resize
    batch: list[np.ndarray] = []

    def flush():
        if batch:
            with torch.inference_mode():
                chunks.append(tok.encode(to_tensor(np.stack(batch)).to(tok.device)).cpu().numpy())
            batch.clear()

    for i, it in enumerate(items):
        im = Image.fromarray(load_item(it))
        for c in range(cfg.crops_per_image):
            u = np.random.default_rng([int(seed), _CROP_TAG, i, c]).random(4)
            batch.append(random_resized_crop(im, size, lo + (hi - lo) * float(u[0]), float(u[1]), float(u[2]),
                                             bool(cfg.hflip and u[3] < 0.5)))
            keys.append(f"{it.key}#crop{c:03d}")
            src.append(it.key)
            if len(batch) == max(cfg.batch_size, 8):
                flush()
    flush()
    header = token_header(tok, model_ref(cfg.tokenizer, tok), size, "fp32")
    header["crops"] = crops_record(cfg, seed)
    labels, classes = _crop_labels(src)
    if classes is not None:
        header["labels"] = labels_header(classes)
    out = Path(cfg.tokens)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_token_file(out, header=header, keys=keys, labels=labels, **{tok.spec.kind: np.concatenate(chunks)})
    return out


def ensure_tokens(cfg: DataSection, seed: int, *, device: str = "cpu") -> Path:
    """The token file to train on: ``cfg.tokens``, first encoded from random crops when ``cfg.tokenizer`` is set
    and the file does not exist (rank 0 of a distributed run encodes, the others wait)."""
    from tokcli.core.token_set import open_tokens

    if not cfg.tokens:
        raise TokUsageError("this objective trains on token data: set [data] tokens = \"codes.npz\" (a tok encode "
                            "token file or set), with tokenizer = NAME to encode random crops of the roots into it")
    path = Path(cfg.tokens)
    if cfg.tokenizer:
        if not path.exists():
            import torch.distributed as dist

            if not dist.is_initialized() or dist.get_rank() == 0:
                encode_crops(cfg, seed, device=device)
            if dist.is_initialized():
                dist.barrier()
        else:
            made = open_tokens(path).header.get("crops")  # a set: its manifest, no shard read
            if made != crops_record(cfg, seed):
                how = made or "no crops record"
                raise TokUsageError(f"{path} exists but was not made from this recipe's crops ({how}); delete it to "
                                    "encode the crops again, or drop data.tokenizer to train on it as it is")
    elif not path.exists():
        raise TokError(f"no such file or folder: {path} (data.tokens)")
    return path


def file_labels(tf) -> tuple[np.ndarray | None, list[str] | None]:
    """(int64 labels or None, class names or None) of a TokenFile or TokenArrays (``labels`` and ``header``)."""
    from tokcli.core.labels import header_classes

    if tf.labels is None:
        return None, None
    lab = np.asarray(tf.labels)
    if lab.ndim != 1:
        raise TokError(f"labels of shape {list(lab.shape)}: one class label per image is needed")
    if lab.dtype.kind == "U":
        names = sorted(set(lab.tolist()))
        return np.searchsorted(np.asarray(names), lab).astype(np.int64), names
    if lab.dtype.kind not in "ui" or (lab.size and lab.min() < 0):
        raise TokError(f"labels must be class ids >= 0 or class names, got {lab.dtype}")
    return lab.astype(np.int64), header_classes(tf.header)


class TokenData:
    """See the module docstring. ``header``: the token file's header (which tokenizer, the token spec)."""

    def __init__(self, cfg: DataSection, *, seed: int, rank: int = 0, world_size: int = 1):
        from tokcli.core.token_set import TokenArrays

        self.cfg, self.seed, self.rank, self.world_size = cfg, int(seed), rank, world_size
        self.path = ensure_tokens(cfg, seed)
        self.data = TokenArrays(self.path)  # a set is validated shard by shard, then mapped from disk, not loaded
        self.check(self.data)
        self.header = self.data.header
        self.setup()
        labels, self.classes = file_labels(self.data)
        self.has_labels = labels is not None
        self.labels = torch.from_numpy(labels) if labels is not None else torch.zeros(len(self.data), dtype=torch.long)
        self._perms: dict[int, np.ndarray] = {}

    def check(self, data) -> None:
        """Refuse tokens this objective cannot train on (one line)."""
        if data.kind != "indices" or not len(data):
            raise TokError(f"{self.path} holds {len(data)} images of {data.kind}; a token generator trains on ids "
                           "(indices) of at least one image")

    def setup(self) -> None:
        """What a subclass derives from the header (e.g. latent normalisation)."""

    def rows(self, index) -> torch.Tensor:
        """The training tensors of images ``index`` (global positions): int64 ids [B, T], flattened in file order."""
        arr = self.data.gather(index)
        return torch.from_numpy(arr.reshape(len(arr), -1).astype(np.int64))

    @property
    def tokens(self) -> torch.Tensor:
        """Every image's rows at once (small sets and checks; training gathers batches with :meth:`rows`)."""
        return self.rows(np.arange(len(self)))

    def __len__(self) -> int:
        return len(self.data)

    def for_rank(self, rank: int, world_size: int) -> "TokenData":
        """The same data (tensors shared, nothing read again) batched for ``rank`` of ``world_size``."""
        import copy

        out = copy.copy(self)
        out.rank, out.world_size, out._perms = rank, world_size, {}
        return out

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, _PERM_TAG, epoch]).permutation(len(self))
        return self._perms[epoch]

    def batch(self, micro: int) -> dict[str, torch.Tensor]:
        b, n = self.cfg.batch_size, len(self)
        first = (micro * self.world_size + self.rank) * b
        idx = torch.as_tensor([int(self._perm(p // n)[p % n]) for p in range(first, first + b)])
        return {"tokens": self.rows(idx.numpy()), "labels": self.labels[idx]}

    def batches(self, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        return (self.batch(m) for m in itertools.count(start))

    def summary(self) -> dict[str, Any]:
        out = {"tokens": str(self.cfg.tokens), "num_images": len(self), "tokenizer": self.header.get("model"),
               "tokenizer_sha256": self.header.get("model_sha256"), "token_shape": self.header["tokens"]["shape"],
               "labels": self.has_labels, "classes": self.classes}
        if self.header.get("crops"):
            out["crops"] = self.header["crops"]
        return out

    def card_text(self, info: dict[str, Any] | None = None) -> str:
        info = info or self.summary()
        line = (f"{info['num_images']} token sequences of shape {info['token_shape']} from `{info['tokens']}` "
                f"(tokenizer `{info['tokenizer']}`)")
        crops = info.get("crops")
        if crops:
            line += (f": {crops['crops_per_image']} random crops of {crops['crop_size']} px per image of "
                     f"{', '.join(crops['roots'])} (short side resized to {crops['random_resize'][0]}-"
                     f"{crops['random_resize'][1]} x the crop size{', flips' if crops['hflip'] else ''})")
        classes = info.get("classes")
        labels = (f"{len(classes)} classes" if classes else "class labels") if info["labels"] else "no labels"
        return f"{line}; {labels}."
