"""Images in and out: find input files, decode them safely, ADM centre crop, [-1, 1] <-> uint8, PNG out.

Conventions (also in the README):

- Every decoded image is uint8 RGB [H, W, 3]. Transparent pixels are composited over **white** (what an
  image viewer shows); 16-bit images are scaled to 8 bits by rounding v/257 (65535 -> 255, 257 -> 1), not
  truncated or clipped; EXIF orientation is applied; an animated file gives its first frame.
- ``to_tensor`` is x/127.5 - 1 computed in float64 and cast to float32, exactly the official WeTok
  preprocessing. ``to_uint8`` clamps to [-1, 1] and **rounds** round((x+1)*127.5); the official WeTok
  scripts truncate instead, which biases every pixel down by half a level on average.
- The pixel limit against decompression bombs is 64 megapixels, or ``TOK_MAX_PIXELS`` from the environment; the
  largest crop size (``--image-size``) is 4096, or ``TOK_MAX_IMAGE_SIZE``.
- Keys: a file named directly (a command-line argument or a line read from stdin) gets its file name as key; a folder
  gives its images' paths relative to it; a ``.tar`` archive gives its image members' paths, as the folder it would
  extract to (read in place, see ``tokcli.core.archives``). Two inputs with one key are refused, naming both.
"""

from __future__ import annotations

import io
import os
import sys
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageOps

from tokcli.core.archives import image_members, is_archive_name, member_byte_limit, read_member
from tokcli.core.atomic import atomic_path, os_error_message
from tokcli.errors import TokError, TokUsageError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MAX_IMAGE_SIZE = 4096
NAME_MAX_BYTES = 255  # longest file name most file systems take

# Formats we decode. Anything else is refused before its pixels are read (EPS, for one, would run Ghostscript).
_FORMATS = frozenset({"PNG", "JPEG", "MPO", "WEBP", "BMP", "DIB", "TIFF", "GIF", "PPM"})
_BACKGROUND = 255  # alpha is composited over white


@dataclass(frozen=True)
class InputItem:
    """One input image: where it is, and its key (relative posix path; token-file key and output name).

    An image inside a tar archive has ``offset`` and ``size`` set: its bytes are ``path[offset:offset + size]``
    (for a tar inside a tar, ``path`` is the outer file)."""

    path: Path
    key: str
    offset: int | None = None
    size: int | None = None

    @property
    def shown(self) -> str:
        """How messages name the image: its path, or ``archive.tar:key``."""
        return str(self.path) if self.offset is None else f"{self.path}:{self.key}"


# --------------------------------------------------------------------------------------------------------
# finding inputs
# --------------------------------------------------------------------------------------------------------
def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTS


def _folder_items(folder: Path, recursive: bool) -> list[InputItem]:
    items = []
    if recursive:
        for root, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if not name.startswith(".") and is_image_name(name):
                    p = Path(root) / name
                    items.append(InputItem(p, p.relative_to(folder).as_posix()))
    else:
        for entry in os.scandir(folder):
            if not entry.name.startswith(".") and is_image_name(entry.name) and entry.is_file():
                items.append(InputItem(Path(entry.path), entry.name))
    if not items:
        hint = "" if recursive else "; images in subfolders need --recursive"
        raise TokError(f"{folder} contains no images (looked for {', '.join(IMAGE_EXTS)}{hint})")
    items.sort(key=lambda it: it.key)
    return items


def collect_inputs(inputs: Sequence[str], *, recursive: bool = True, stdin: IO[str] | None = None
                   ) -> list[InputItem]:
    """Expand command-line inputs into image items, in a deterministic order.

    - a folder: every image file under it (extensions in IMAGE_EXTS, any case; names starting with '.' are
      skipped), key = path relative to the folder, sorted by key;
    - a ``.tar`` file: every image member, keys as the folder it extracts to would give, sorted
      (``tokcli.core.archives``; a compressed tar is refused);
    - another file: always attempted whatever its extension, key = its file name;
    - ``-``: one path per line from ``stdin`` (default sys.stdin), blank lines skipped; each line is taken as if
      it were an argument (a file: its file name; a folder: expanded as above).

    One rule for both: a file named directly gets its file name as key, a folder gives paths relative to it, so
    ``find DIR -name '*.png' | tok encode -`` and ``tok encode DIR/*.png`` give the same keys.

    Raises TokUsageError when there are no inputs, TokError for a missing path, a folder without images, or
    two inputs that give the same key.
    """
    if not inputs:
        raise TokUsageError("no inputs given (pass image files, folders, or - to read paths from stdin)")
    items: list[InputItem] = []

    def add(arg: str) -> None:
        p = Path(arg)
        if p.is_dir():
            items.extend(_folder_items(p, recursive))
        elif p.is_file() and is_archive_name(p.name):
            items.extend(InputItem(p, m.key, m.offset, m.size) for m in image_members(p, IMAGE_EXTS))
        elif p.exists():
            items.append(InputItem(p, p.name))
        else:
            raise TokError(f"no such file or folder: {arg}")

    for arg in inputs:
        if arg == "-":
            stream = sys.stdin if stdin is None else stdin
            lines = [ln.strip() for ln in stream.read().splitlines()]
            lines = [ln for ln in lines if ln]
            if not lines:
                raise TokError("no paths were read from stdin")
            for line in lines:
                add(line)
        else:
            add(arg)

    seen: dict[str, str] = {}
    for it in items:
        if it.key in seen:
            raise TokError(f"two inputs give the same key {it.key!r}: {seen[it.key]} and {it.shown} "
                           "(pass their common parent folder instead)")
        seen[it.key] = it.shown
    return items


# --------------------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------------------
def max_pixels() -> int:
    """The decompression-bomb limit in pixels: TOK_MAX_PIXELS from the environment, else 64 megapixels."""
    raw = os.environ.get("TOK_MAX_PIXELS", "")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        raise TokUsageError(f"TOK_MAX_PIXELS must be a number of pixels, got {raw!r}") from None
    if value <= 0:
        raise TokUsageError(f"TOK_MAX_PIXELS must be positive, got {raw!r}")
    return value


def max_image_size() -> int:
    """The largest ``--image-size``: TOK_MAX_IMAGE_SIZE from the environment, else 4096."""
    raw = os.environ.get("TOK_MAX_IMAGE_SIZE", "")
    if not raw:
        return DEFAULT_MAX_IMAGE_SIZE
    try:
        value = int(raw)
    except ValueError:
        raise TokUsageError(f"TOK_MAX_IMAGE_SIZE must be a whole number of pixels, got {raw!r}") from None
    if value <= 0:
        raise TokUsageError(f"TOK_MAX_IMAGE_SIZE must be positive, got {raw!r}")
    return value


def check_image_size(size: int | None) -> int | None:
    """Refuse a crop size above :func:`max_image_size` (a usage error) before any work; None passes."""
    if size is None:
        return None
    if size <= 0:
        raise TokUsageError(f"image size must be positive, got {size}")
    limit = max_image_size()
    if size > limit:
        raise TokUsageError(f"--image-size {size} is above the maximum of {limit} (set TOK_MAX_IMAGE_SIZE to "
                            "allow larger crops)")
    return size


def _composite_white(rgba: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 4] (straight alpha) -> uint8 [H, W, 3] over the background, rounded."""
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    out = (rgb * a + _BACKGROUND * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _to_rgb_array(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return np.array(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        v = np.asarray(im).astype(np.int64)
        # 16-bit values (I;16*, and mode I as Pillow gives for 16-bit files) map to 8 bits by round(v/257).
        v = (np.clip(v, 0, 65535) + 128) // 257
        return np.repeat(v.astype(np.uint8)[..., None], 3, axis=-1)
    if mode == "F":
        v = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        if v.size and v.max() <= 1.0:  # float images are normally in [0, 1]; larger values are taken as 0..255
            v = v * 255.0
        v = np.clip(np.rint(v), 0, 255).astype(np.uint8)
        return np.repeat(v[..., None], 3, axis=-1)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return _composite_white(np.array(im.convert("RGBA"), dtype=np.uint8))
    try:
        return np.array(im.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as e:
        raise TokError(f"unsupported image mode {mode} ({e})") from None


def load_image(path: str | os.PathLike, *, offset: int | None = None, size: int | None = None,
               shown_as: str | None = None) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3]; any failure is a one-line TokError naming the file.

    With ``offset`` the image is the ``size`` bytes at ``offset`` of ``path`` (a tar member, read with its own
    file handle, so decode threads share nothing); messages then name ``shown_as`` (``archive.tar:key``)."""
    path = Path(path)
    shown = shown_as or str(path)
    if offset is None:
        _check_file(path)
        return _decode(path, shown)
    limit = member_byte_limit(max_pixels())
    return _decode(io.BytesIO(read_member(path, offset, size or 0, limit=limit, shown_as=shown)), shown)


def load_item(item: InputItem) -> np.ndarray:
    """:func:`load_image` of an input item (a file, or an image inside a tar archive)."""
    return load_image(item.path, offset=item.offset, size=item.size, shown_as=item.shown)


def _check_file(path: Path) -> None:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise TokError(f"{path}: no such file") from None
    except OSError as e:
        raise TokError(f"{path}: cannot read ({e.strerror or e})") from None
    if path.is_dir():
        raise TokError(f"{path}: is a folder, not an image")
    if size == 0:
        raise TokError(f"{path}: empty file (0 bytes)")


def _decode(source: Path | io.BytesIO, shown: str) -> np.ndarray:
    """Pillow decoding under this module's rules (formats, pixel limit, EXIF, modes); messages name ``shown``."""
    limit = max_pixels()
    # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that; we refuse above the limit. The warning
    # is made an error here, and the explicit size check below refuses the same images even in decode threads,
    # where catch_warnings (process-wide state) may be racing with another thread's.
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with (open(source, "rb") if isinstance(source, Path) else source) as f, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                if im.format not in _FORMATS:
                    raise TokError(f"{shown}: {im.format} files are not supported "
                                   f"(supported: {', '.join(sorted(_FORMATS))})")
                w, h = im.size
                if w * h > limit:
                    raise Image.DecompressionBombError("")
                if w == 0 or h == 0:
                    raise TokError(f"{shown}: image has zero width or height")
                im.seek(0)  # first frame of an animation
                im.load()
                try:
                    im2 = ImageOps.exif_transpose(im)
                except Exception:  # damaged EXIF: keep the pixels as stored
                    im2 = im
                arr = _to_rgb_array(im2)
    except TokError as e:
        msg = str(e)
        raise TokError(msg if msg.startswith(shown) else f"{shown}: {msg}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise TokError(f"{shown}: image is larger than the {limit}-pixel limit (a possible decompression bomb; "
                       "raise TOK_MAX_PIXELS to allow it)") from None
    except Image.UnidentifiedImageError:
        raise TokError(f"{shown}: not an image file (or a format tok cannot read)") from None
    except MemoryError:
        raise TokError(f"{shown}: out of memory while decoding") from None
    except Exception as e:  # Pillow raises many types for damaged data: OSError, SyntaxError, ValueError, ...
        reason = " ".join(str(e).split()) or type(e).__name__
        raise TokError(f"{shown}: cannot decode ({reason})") from None
    return arr


# --------------------------------------------------------------------------------------------------------
# cropping and value ranges
# --------------------------------------------------------------------------------------------------------
def adm_center_crop(img: np.ndarray, size: int) -> np.ndarray:
    """The ADM ``center_crop_arr`` protocol: BOX-halve while the short side >= 2*size, BICUBIC-resize the short
    side to ``size``, then take the centred size x size window. uint8 [H, W, 3] -> uint8 [size, size, 3]."""
    if size <= 0:
        raise TokUsageError(f"image size must be positive, got {size}")
    pil = Image.fromarray(np.ascontiguousarray(img))
    while min(pil.size) >= 2 * size:
        pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), resample=Image.BOX)
    scale = size / min(pil.size)
    new = (round(pil.size[0] * scale), round(pil.size[1] * scale))
    if new[0] * new[1] > max(max_pixels(), 4 * size * size):
        raise TokError(f"image of {img.shape[1]}x{img.shape[0]} has too extreme an aspect ratio to resize to "
                       f"a {size}-pixel short side")
    pil = pil.resize(new, resample=Image.BICUBIC)
    arr = np.asarray(pil)
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def to_tensor(batch):
    """uint8 [N, H, W, 3] (or one [H, W, 3]) -> float32 torch [N, 3, H, W] in [-1, 1], as x/127.5 - 1 in
    float64 cast to float32 (bit-identical to the official WeTok preprocessing)."""
    import torch

    batch = np.asarray(batch)
    if batch.dtype != np.uint8:
        raise TypeError(f"to_tensor expects uint8 images, got {batch.dtype}")
    if batch.ndim == 3:
        batch = batch[None]
    x = (batch / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def to_uint8(x) -> np.ndarray:
    """float torch [N, 3, H, W] (or [3, H, W]) in [-1, 1] -> uint8 numpy [N, H, W, 3]: clamp, then round
    round((x + 1) * 127.5) (half to even). NaN becomes 0, i.e. grey 128. The official scripts truncate."""
    import torch

    x = torch.as_tensor(x).detach().to("cpu", torch.float64)
    if x.ndim == 3:
        x = x[None]
    x = torch.nan_to_num(x, nan=0.0).clamp(-1.0, 1.0)
    y = ((x + 1.0) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().numpy()


# --------------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------------
def save_png(img: np.ndarray, dest: str | os.PathLike, *, shown_as: str | os.PathLike | None = None) -> None:
    """Write uint8 [H, W, 3] (or [H, W]) as PNG, atomically (parents are created). A failure (full disk, ...) is a
    one-line TokError naming ``shown_as`` (default ``dest``: a staged file is named by its final place)."""
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"save_png expects uint8, got {img.dtype}")
    try:
        with atomic_path(dest, suffix=".png") as tmp:
            Image.fromarray(np.ascontiguousarray(img)).save(tmp, format="PNG")
    except OSError as e:
        raise TokError(os_error_message(e, dest if shown_as is None else shown_as)) from None


def output_path(out_dir: str | os.PathLike, key: str) -> Path:
    """out_dir / key with the extension replaced by .png; keys that would leave out_dir are refused."""
    if "\0" in key:
        raise TokError(f"key {key!r} contains a NUL character, which no file name can hold")
    k = key.replace("\\", "/")
    pure = PurePosixPath(k)
    if not k or pure.is_absolute() or ".." in pure.parts or (len(k) > 1 and k[1] == ":"):
        raise TokError(f"key {key!r} would write outside the output folder")
    parts = [p for p in pure.parts if p != "."]
    if not parts:
        raise TokError(f"key {key!r} names no file")
    rel = PurePosixPath(*parts)
    try:
        rel = rel.with_suffix(".png")
    except ValueError:
        raise TokError(f"key {key!r} names no file") from None
    try:
        sizes = [len(os.fsencode(p)) for p in rel.parts]
    except UnicodeError:
        raise TokError(f"key {key!r} cannot be a file name on this system") from None
    if max(sizes) > NAME_MAX_BYTES:
        raise TokError(f"key {key[:60]!r}... has a name of {max(sizes)} bytes, longer than the {NAME_MAX_BYTES} "
                       "a file name can have")
    return Path(out_dir, *rel.parts)


def output_paths(out_dir: str | os.PathLike, keys: Iterable[str]) -> list[Path]:
    """output_path for every key; TokError when two keys map to one file (e.g. a.jpg and a.png)."""
    seen: dict[Path, str] = {}
    out = []
    for key in keys:
        p = output_path(out_dir, key)
        if p in seen:
            raise TokError(f"inputs {seen[p]!r} and {key!r} would both be written to {p}")
        seen[p] = key
        out.append(p)
    return out


# --------------------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------------------
def load_cropped(item: InputItem, size: int | None) -> np.ndarray:
    """Decode one item and ADM-centre-crop it to size (None: keep the native size)."""
    return _load_counted(item, size)[0]


def is_upscaled(shape: Sequence[int], size: int | None) -> bool:
    """Whether an image of ``shape`` [H, W, ...] is enlarged more than 2x to reach a ``size`` crop."""
    return size is not None and 2 * min(shape[0], shape[1]) < size


def _load_counted(item: InputItem, size: int | None) -> tuple[np.ndarray, bool]:
    img = load_item(item)
    if size is None:
        return img, False
    try:
        return adm_center_crop(img, size), is_upscaled(img.shape, size)
    except TokError as e:
        raise TokError(f"{item.shown}: {e}") from None


def iter_batches(items: Sequence[InputItem], size: int | None, batch_size: int, *, skip_errors: bool = False,
                 errors: list | None = None, workers: int = 0, stats: dict | None = None
                 ) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yield (keys, uint8 [B, H, W, 3]) batches in input order.

    Each image is decoded and ADM-centre-cropped to ``size``. With ``size=None`` images keep their own size and
    a batch only holds consecutive images of equal size. A file that fails raises its TokError, or with
    ``skip_errors`` is recorded as (key, message) in ``errors`` and left out. ``workers`` > 0 decodes ahead in
    that many threads (the order stays the same). ``stats["upscaled"]`` (when given) counts the images smaller
    than half the crop size, which are enlarged more than 2x.
    """
    if batch_size <= 0:
        raise TokUsageError(f"batch size must be positive, got {batch_size}")
    if skip_errors and errors is None:
        raise ValueError("skip_errors=True needs an errors list")

    def results() -> Iterator[tuple[InputItem, np.ndarray | TokError]]:
        def run(it):
            try:
                return _load_counted(it, size)
            except TokError as e:
                return e

        if workers <= 0:
            for it in items:
                yield it, run(it)
            return
        ahead = max(2 * batch_size, 4 * workers)
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tok-decode") as pool:
            pending: deque = deque()
            index = 0
            try:
                while index < len(items) or pending:
                    while index < len(items) and len(pending) < ahead:
                        pending.append((items[index], pool.submit(run, items[index])))
                        index += 1
                    it, fut = pending.popleft()
                    yield it, fut.result()
            finally:
                for _, fut in pending:
                    fut.cancel()

    keys: list[str] = []
    imgs: list[np.ndarray] = []
    for it, res in results():
        if isinstance(res, TokError):
            if not skip_errors:
                raise res
            errors.append((it.key, str(res)))
            continue
        res, upscaled = res
        if upscaled and stats is not None:
            stats["upscaled"] = stats.get("upscaled", 0) + 1
        if imgs and (len(imgs) == batch_size or res.shape != imgs[0].shape):
            yield keys, np.stack(imgs)
            keys, imgs = [], []
        keys.append(it.key)
        imgs.append(res)
    if imgs:
        yield keys, np.stack(imgs)
