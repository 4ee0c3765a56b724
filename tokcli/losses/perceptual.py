"""LPIPS (Zhang et al. 2018) through the ``lpips`` package, loaded without touching the network.

The ``lpips`` wheel ships only the small linear heads (``lpips/weights/v0.1/{vgg,alex}.pth``; nothing to fetch).
The convolutional backbone is torchvision's ImageNet VGG16 / AlexNet, which torchvision would download into the torch
hub cache (``$TORCH_HOME/hub/checkpoints``, default ``~/.cache/torch/hub/checkpoints``). torchvision is never let
download it: the backbone is built with random weights (``pnet_rand=True``) and, for ``backbone="pretrained"``, the
file is found, or fetched only when asked, by tok's one rule (tokcli/core/pretrained.py), read with
``torch.load(weights_only=True)`` and copied in. A missing file is a one-line MissingWeightsError.

``backbone="random"`` keeps the random backbone. That is a valid loss/metric *plumbing* but its numbers are not
LPIPS; a recipe has to ask for it explicitly (``perceptual = "lpips-vgg-random"``) and the trainer records it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tokcli.core import pretrained
from tokcli.errors import MissingWeightsError, TokUsageError

# torchvision's ImageNet weights: file name in the hub cache and where torchvision fetches it from.
BACKBONE_FILES = {
    "vgg": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
    "alex": ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"),
}


def backbone_path(net: str) -> Path:
    """Where torchvision keeps the backbone file for ``net`` (``vgg`` or ``alex``)."""
    if net not in BACKBONE_FILES:
        raise TokUsageError(f"unknown LPIPS network {net!r} (use one of {sorted(BACKBONE_FILES)})")
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net][0]


def backbone_spec(net: str, *, bench: bool = True) -> pretrained.PretrainedFile:
    """The backbone file under tok's one rule for pretrained files. ``bench``: the caller is `tok bench`
    (``--lpips-weights``, ``--download``); otherwise training (``TOK_DOWNLOAD=1`` only)."""
    path = backbone_path(net)
    fname, url = BACKBONE_FILES[net]
    return pretrained.PretrainedFile(
        what=f"the LPIPS-{net} backbone (torchvision ImageNet weights)", name=fname, folder=path.parent, url=url,
        option="--lpips-weights" if bench else None, sha256_prefix=fname.rsplit("-", 1)[1].split(".")[0],
        fetch_flag="--download" if bench else None)


def _copy_backbone(trunk: nn.Module, state: dict, source: Path) -> None:
    """Copy torchvision ``features.{i}.*`` weights into lpips' trunk, whose slices keep the layer indices as names
    (``slice2.5.weight`` is ``features.5.weight``). Every conv of the trunk must be filled."""
    filled = 0
    with torch.no_grad():
        for slice_ in trunk.children():
            for idx, layer in slice_.named_children():
                for pname, param in layer.named_parameters(recurse=False):
                    key = f"features.{idx}.{pname}"
                    if key not in state or tuple(state[key].shape) != tuple(param.shape):
                        raise MissingWeightsError(f"{source} is not the expected torchvision backbone "
                                                  f"(tensor {key} missing or of the wrong shape); delete it and "
                                                  f"put the original file there")
                    param.copy_(state[key].to(param.dtype))
                    filled += 1
    if filled == 0:
        raise MissingWeightsError(f"{source}: no backbone tensors were loaded")


def load_lpips(net: str = "vgg", *, backbone: str = "pretrained", device="cpu",
               weights: str | Path | None = None, download: bool | None = None) -> nn.Module:
    """An ``lpips.LPIPS`` module (v0.1 linear heads), in eval mode with every parameter frozen.

    net: ``"vgg"`` (the training loss of WeTok) or ``"alex"`` (the usual metric).
    backbone: ``"pretrained"`` (torchvision ImageNet weights from the hub cache; MissingWeightsError naming the
    file, the folder, the URL and how to fetch it when absent) or ``"random"`` (random backbone; only when a
    recipe asks for it).
    weights: an explicit backbone file (torchvision format) instead of the hub cache (``--lpips-weights``).
    download: fetch a missing backbone (`tok bench --download`); None for training, where only ``TOK_DOWNLOAD=1``
    asks (never under ``HF_HUB_OFFLINE`` / ``TOK_OFFLINE``).
    """
    if backbone not in ("pretrained", "random"):
        raise TokUsageError(f"LPIPS backbone must be 'pretrained' or 'random', got {backbone!r}")
    path = None
    if backbone == "pretrained":
        hint = "" if download is not None else \
            f" (or choose perceptual = \"lpips-{net}-random\" or \"none\" in the recipe)"
        path = pretrained.ensure(backbone_spec(net, bench=download is not None), weights, download=download,
                                 hint=hint)

    import warnings

    import lpips

    with warnings.catch_warnings():  # torchvision's "pretrained is deprecated" chatter
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    if backbone == "pretrained":
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # damaged / truncated download
            raise MissingWeightsError(f"cannot read the LPIPS backbone {path} ({type(e).__name__}: {e}); "
                                      f"delete it and put the original file there") from None
        _copy_backbone(model.net, state, path)
    model.backbone = backbone  # recorded by callers (model cards, metric JSON)
    model.backbone_file = path  # the pretrained file read (None for a random backbone)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device)


def lpips_distance(model: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image LPIPS between two batches [B, 3, H, W] in [-1, 1] -> tensor [B] (differentiable in a and b)."""
    return model(a, b).reshape(a.shape[0])
