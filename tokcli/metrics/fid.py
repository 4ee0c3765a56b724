"""FID: the TF-ported Inception-v3 and its pool3 features.

Definitions (what every number written by tok means):

- **Network.** Inception-v3 from TensorFlow's ``inception-2015-12-05`` graph as ported to PyTorch by pytorch-fid
  (weights ``pt_inception-2015-12-05-6726825d.pth``; torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth``
  is its copy of that port, with the same key names). It differs from torchvision's Inception-v3 in the
  weights, in 1008 output classes, in the average-pool branches of Mixed_5b-5d, Mixed_6b-6e and Mixed_7b, which
  average only over in-image pixels (TF's pooling ignores the zero padding: ``count_include_pad=False``), and in
  Mixed_7c, whose pool branch is a 3x3 *max* pool (as in the TF graph). The classifier ``fc`` is loaded but unused.
  The layers are written out here rather than imported from torchvision: importing torchvision also imports
  ``torch._dynamo`` (through ``torchvision.ops``), 2-7 s of start-up for every ``tok bench rfid`` / ``stats``.
- **Features.** The 2048-d output of the final global average pool ("pool3"), float32.
- **Input.** :class:`FIDInception` takes float images in [-1, 1], [N, 3, H, W], any H and W, and resizes them to
  299x299 with ``F.interpolate(mode="bilinear", align_corners=False, antialias=False)``: pytorch-fid's resize (no
  antialiasing, so a downscale from a large image aliases exactly as it does there; this is not torch-fidelity's
  TF1-exact resize, nor clean-fid's PIL bicubic). :func:`features_from_uint8` takes uint8 [N, H, W, 3] and does what
  pytorch-fid does to an image file, in its order: ``x / 255``, resize, ``2x - 1``, so its features are
  pytorch-fid's.

Statistics, stats files and the Fréchet distance live in :mod:`tokcli.metrics.fid_stats` (re-exported here).

Weights are looked up (:func:`load_fid_inception`): an explicit file, then ``$TORCH_HOME/hub/checkpoints`` under
pytorch-fid's or torch-fidelity's file name; pytorch-fid's GitHub release is fetched only when asked (``--download``
or ``TOK_DOWNLOAD=1``) and never under ``HF_HUB_OFFLINE`` / ``TOK_OFFLINE`` (tokcli/core/pretrained.py). There is
never a random-weights fallback; the sha256 of the file is returned for the record.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokcli.core import pretrained
from tokcli.core.checkpoint import sha256_file
from tokcli.core.pretrained import PretrainedFile
from tokcli.errors import MissingWeightsError
from tokcli.metrics.fid_stats import FEATURE_DIM, STATS_EXTRA_KEYS, FeatureStats, frechet_distance, load_stats

__all__ = ["FEATURE_DIM", "FIDInception", "FeatureStats", "STATS_EXTRA_KEYS", "features_from_uint8",
           "find_fid_weights", "frechet_distance", "inception_score", "load_fid_inception", "load_stats",
           "logits_from_features", "resize_299", "weights_folder", "weights_spec"]

INPUT_SIZE = 299
NUM_CLASSES = 1008
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's name
WEIGHTS_FILE_FIDELITY = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name, same layout
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_FILE}"

# ----------------------------------------------------------------------------------------------------- network


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that, like TF's, divides by the number of in-image pixels at the border."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class _Conv(nn.Module):
    """Convolution without bias, BatchNorm (eps 1e-3, TF's), ReLU: the unit of every Inception layer. The names
    ``conv`` / ``bn`` are those of the weight file."""

    def __init__(self, cin: int, cout: int, kernel, stride: int = 1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _row(cin: int, cout: int, k: int) -> _Conv:
    """A 1 x k convolution that keeps the size."""
    return _Conv(cin, cout, (1, k), padding=(0, k // 2))


def _col(cin: int, cout: int, k: int) -> _Conv:
    """A k x 1 convolution that keeps the size."""
    return _Conv(cin, cout, (k, 1), padding=(k // 2, 0))


def _chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class _BlockA(nn.Module):
    """Mixed_5b-5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | TF average pool-1x1."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = _Conv(cin, 48, 1), _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1x1(x), _chain(x, self.branch5x5_1, self.branch5x5_2),
                          _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class _BlockB(nn.Module):
    """Mixed_6a, 35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | 3x3/2 max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = _Conv(64, 96, 3, padding=1), _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3x3(x), _chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _BlockC(nn.Module):
    """Mixed_6b-6e (17x17), 7x7 factorised into 1x7 and 7x1: 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | TF average
    pool-1x1."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c = channels_7x7
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2, self.branch7x7_3 = _Conv(cin, c, 1), _row(c, c, 7), _col(c, 192, 7)
        self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3 = _Conv(cin, c, 1), _col(c, c, 7), _row(c, c, 7)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = _col(c, c, 7), _row(c, 192, 7)
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = _chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3)
        bd = _chain(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                    self.branch7x7dbl_5)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_tf_avg_pool(x))], 1)


class _BlockD(nn.Module):
    """Mixed_7a, 17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | 3x3/2 max pool."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = _Conv(cin, 192, 1), _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1, self.branch7x7x3_2 = _Conv(cin, 192, 1), _row(192, 192, 7)
        self.branch7x7x3_3, self.branch7x7x3_4 = _col(192, 192, 7), _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = _chain(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4)
        return torch.cat([_chain(x, self.branch3x3_1, self.branch3x3_2), b7, F.max_pool2d(x, kernel_size=3, stride=2)],
                         1)


class _BlockE(nn.Module):
    """Mixed_7b / 7c (8x8), 3x3 split into parallel 1x3 and 3x1: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1,
    the pool ``"avg"`` (TF border averaging; Mixed_7b) or ``"max"`` (Mixed_7c)."""

    def __init__(self, cin: int, pool: str) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1, self.branch3x3_2a, self.branch3x3_2b = _Conv(cin, 384, 1), _row(384, 384, 3), \
            _col(384, 384, 3)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = _Conv(cin, 448, 1), _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = _row(384, 384, 3), _col(384, 384, 3)
        self.branch_pool = _Conv(cin, 192, 1)
        self._pool = _tf_avg_pool if pool == "avg" else _max_pool_same

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], 1)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(self._pool(x))], 1)


def resize_299(x: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's resize: bilinear to 299x299, ``align_corners=False``, no antialiasing."""
    return F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False, antialias=False)


class FIDInception(nn.Module):
    """The FID Inception-v3 (see the module docstring). ``forward``: float [N, 3, H, W] in [-1, 1] -> [N, 2048].

    Parameter names equal those of pytorch-fid's ``fid_inception_v3()`` (``Conv2d_1a_3x3.conv.weight`` ...
    ``Mixed_7c.branch_pool.bn.running_var``, ``fc.weight``), so its weight file loads with ``strict=True``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _BlockA(192, pool_features=32)
        self.Mixed_5c = _BlockA(256, pool_features=64)
        self.Mixed_5d = _BlockA(288, pool_features=64)
        self.Mixed_6a = _BlockB(288)
        self.Mixed_6b = _BlockC(768, channels_7x7=128)
        self.Mixed_6c = _BlockC(768, channels_7x7=160)
        self.Mixed_6d = _BlockC(768, channels_7x7=160)
        self.Mixed_6e = _BlockC(768, channels_7x7=192)
        self.Mixed_7a = _BlockD(768)
        self.Mixed_7b = _BlockE(1280, pool="avg")
        self.Mixed_7c = _BlockE(2048, pool="max")
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES)  # the TF classifier: in the weight file, unused for FID

    @classmethod
    def from_state_dict(cls, state_dict: dict, source: str = "the state dict") -> "FIDInception":
        """Build the network from pytorch-fid's state dict (strict: every key and shape must match), eval mode,
        frozen, on the CPU. ``source`` names the file in error messages."""
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise MissingWeightsError(f"{source} is not a state dict of tensors (expected the FID Inception weights "
                                      f"{WEIGHTS_FILE})")
        state = {}
        for k, v in state_dict.items():
            state[k] = v.detach().to(dtype=torch.float32, copy=True) if v.is_floating_point() else v.detach().clone()
        # BatchNorm step counters do not affect eval-mode outputs; some exports of these weights omit them.
        with torch.device("meta"):
            model = cls()
        for name, buf in model.named_buffers():
            if name.endswith("num_batches_tracked") and name not in state:
                state[name] = torch.zeros((), dtype=torch.long)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            detail = " ".join(line.strip() for line in first[:3])
            raise MissingWeightsError(f"{source} is not the FID Inception-v3 weights ({WEIGHTS_FILE}): "
                                      f"{detail[:300]}") from None
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def pool3(self, x: torch.Tensor) -> torch.Tensor:
        """The network proper on already-resized input: float [N, 3, 299, 299] in [-1, 1] -> [N, 2048]."""
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"FIDInception expects float images [N, 3, H, W] in [-1, 1], got shape {tuple(x.shape)}")
        x = x.to(device=self.fc.weight.device, dtype=torch.float32)
        return self.pool3(resize_299(x))


# ----------------------------------------------------------------------------------------------------- weights


def weights_folder() -> Path:
    """Where pytorch-fid and torch-fidelity keep the weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_spec() -> PretrainedFile:
    """The FID Inception weights under tok's one rule for pretrained files (tokcli/core/pretrained.py)."""
    return PretrainedFile(what="the FID Inception weights", name=WEIGHTS_FILE, folder=weights_folder(),
                          url=WEIGHTS_URL, aliases=(WEIGHTS_FILE_FIDELITY,), option="--inception-weights")


def find_fid_weights(weights: str | os.PathLike | None = None) -> Path | None:
    """The weight file that would be used, without downloading: ``weights`` (must exist) or a cached copy."""
    return pretrained.locate(weights_spec(), weights)


def load_fid_inception(weights: str | os.PathLike | None = None, device="cpu", *,
                       download: bool | None = False) -> tuple[FIDInception, str]:
    """The FID Inception in eval mode on ``device`` and the sha256 (hex) of its weight file.

    Search order: ``weights``; ``$TORCH_HOME/hub/checkpoints/`` under pytorch-fid's name (``WEIGHTS_FILE``) or
    torch-fidelity's. Downloaded there only when asked (``download`` or ``TOK_DOWNLOAD=1``) and not offline
    (tokcli/core/pretrained.py); otherwise a one-line :class:`MissingWeightsError`; never random weights.
    """
    path = pretrained.ensure(weights_spec(), weights, download=download)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated download, a pickled model instead of a state dict, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise MissingWeightsError(f"cannot read the FID Inception weights {path} ({type(e).__name__}: "
                                  f"{msg[:200]}); replace it with the original {WEIGHTS_FILE}") from None
    model = FIDInception.from_state_dict(state, source=str(path))
    return model.to(device), sha256_file(path)


# ----------------------------------------------------------------------------------------------------- features


@torch.inference_mode()
def features_from_uint8(model: FIDInception, images, batch_size: int = 50, device=None) -> np.ndarray:
    """pool3 features (float64 numpy [N, 2048]) of uint8 images [N, H, W, 3] (numpy or torch).

    Per image, as pytorch-fid does for a file: ``x / 255`` in float32, bilinear resize to 299, ``2x - 1``.
    ``device`` defaults to the model's.
    """
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8:
            raise TypeError(f"features_from_uint8 expects uint8 images, got {images.dtype}")
    else:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise TypeError(f"features_from_uint8 expects uint8 images, got {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images [N, H, W, 3], got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else model.fc.weight.device
    n = images.shape[0]
    out = np.empty((n, FEATURE_DIM), dtype=np.float64)
    for i in range(0, n, batch_size):
        chunk = images[i:i + batch_size]
        x = chunk if isinstance(chunk, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(chunk))
        x = x.to(device).permute(0, 3, 1, 2).to(torch.float32).div(255)
        x = 2 * resize_299(x) - 1
        out[i:i + len(chunk)] = model.pool3(x).to(torch.float64).cpu().numpy()
    return out


# ----------------------------------------------------------------------------------------------------- Inception Score


def logits_from_features(model: FIDInception, features) -> np.ndarray:
    """The 1008 class logits of pool3 ``features`` [N, 2048] in float64: ``features @ fc.weight.T`` without the
    bias, as ADM's evaluator (``softmax/logits/MatMul`` of the TF graph) and torch-fidelity (``logits_unbiased``)
    compute them for the Inception Score."""
    w = model.fc.weight.detach().to("cpu", torch.float64).numpy()
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[1] != w.shape[1]:
        raise ValueError(f"expected pool3 features [N, {w.shape[1]}], got shape {tuple(f.shape)}")
    return f @ w.T


def log_softmax(logits) -> np.ndarray:
    """Row-wise log-softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` of class logits [N, C] (float64), p(y) the mean of p(y|x)
    over each split; sample i is in split ``i % splits`` (so class-sorted samples still mix in every split).
    Returns (mean, std) over the splits (std with ddof 0, as torch-fidelity)."""
    logp = log_softmax(logits)
    n = logp.shape[0]
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= n:
        raise ValueError(f"splits must be in 1..{n} (the number of samples), got {splits!r}")
    scores = []
    for k in range(splits):
        lp = logp[k::splits]
        p = np.exp(lp)
        with np.errstate(divide="ignore", invalid="ignore"):  # classes of p(y) = 0 have p(y|x) = 0: no term
            kl = np.where(p > 0, p * (lp - np.log(p.mean(axis=0))), 0.0)
        scores.append(float(np.exp(kl.sum(axis=1).mean())))
    return float(np.mean(scores)), float(np.std(scores))
