"""ViT encoder and decoder of 1-D latent-token tokenizers (SoftVQ-VAE), on timm ``VisionTransformer`` blocks.

The blocks are the DINOv2 architectures (timm ``vit_{small,base,large}_patch14_dinov2``): pre-LN (LayerNorm eps
1e-6), qkv with bias, exact GELU, MLP 4x, LayerScale (``ls1`` / ``ls2``), a learned absolute position table with a
slot for the cls token. The patch size and image size are set by the model (16 and 256 / 512 for SoftVQ), the depth
by the checkpoint (see :func:`vit_arch`). Attention is timm's fused path (``F.scaled_dot_product_attention``).

    encoder  [cls, patches + pos, latent_tokens + latent_pos_embed] -> blocks -> norm -> last L tokens   [B, L, D]
    decoder  [cls, mask_token x N + pos, tokens + latent_pos_embed] -> blocks -> norm -> tokens 1..N
             -> Linear(D, 3 p^2) -> unpatchify (row-in-patch, col-in-patch, RGB; patches in raster order)

Module names are timm's inside ``model.`` (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.i.*``,
``norm``), so a timm DINOv2 state dict loads into ``model`` and the official SoftVQ keys load as they are (the
decoder has no ``patch_embed``; its ``to_pixel`` Linear is the official ``to_pixel.model``).

Nothing is downloaded to build these modules: :func:`load_dinov2` (a training option) reads timm's DINOv2 weights
from the local Hugging Face cache and names the missing file otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from tokcli.errors import TokError

# timm DINOv2 architecture name -> (width, heads, depth of the released model)
DINOV2_ARCHS = {
    "vit_small_patch14_dinov2": (384, 6, 12),
    "vit_base_patch14_dinov2": (768, 12, 12),
    "vit_large_patch14_dinov2": (1024, 16, 24),
}
# tok's own DINOv2-style block at the ViT-Ti width, for CPU demo models: no released weights exist for it
TOK_ARCHS = {"tok_vit_tiny": (192, 3, 12)}
LAYER_SCALE_INIT = 1e-5  # timm's DINOv2 init_values


def vit_arch(name: str) -> tuple[int, int, int]:
    """(width, heads, default depth) of a timm DINOv2 name, with or without its pretrained tag (``.lvd142m``)."""
    base = str(name).split(".", 1)[0]
    arch = DINOV2_ARCHS.get(base) or TOK_ARCHS.get(base)
    if arch is None:
        raise TokError(f"unsupported ViT {name!r}: the SoftVQ blocks are the DINOv2 architectures "
                       f"{', '.join(k + '.lvd142m' for k in DINOV2_ARCHS)} (or tok's {', '.join(TOK_ARCHS)})")
    return arch


def build_vit(name: str, *, depth: int | None, image_size: int, patch_size: int, drop_path: float = 0.0,
              patch_embed: bool = True, layer_scale_init: float = LAYER_SCALE_INIT) -> nn.Module:
    """A timm ``VisionTransformer`` of the DINOv2 architecture ``name`` (random init; no head, no download).
    ``patch_embed=False`` drops the patch convolution (a decoder feeds its own tokens). ``layer_scale_init`` only
    sets the initial LayerScale (DINOv2's 1e-5 keeps a fresh block near identity: right for fine-tuning, slow for a
    short run from scratch)."""
    from timm.models.vision_transformer import VisionTransformer

    width, heads, default_depth = vit_arch(name)
    depth = int(default_depth if depth is None else depth)
    if depth < 1:
        raise TokError(f"ViT depth must be at least 1, got {depth}")
    if image_size % patch_size:
        raise TokError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
    vit = VisionTransformer(img_size=image_size, patch_size=patch_size, num_classes=0, global_pool="",
                            embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4.0, qkv_bias=True,
                            init_values=float(layer_scale_init), class_token=True, no_embed_class=False,
                            drop_path_rate=drop_path)
    for blk in vit.blocks:
        blk.attn.fused_attn = True  # SDPA, whatever TIMM_FUSED_ATTN says
    if not patch_embed:
        vit.patch_embed = nn.Identity()
    return vit


@torch.no_grad()
def fold_layer_scale(vit: nn.Module) -> None:
    """Inference only: multiply each block's LayerScale into the Linear before it (``attn.proj``, ``mlp.fc2``:
    rows and bias) and drop the multiply. Same maths, one element-wise pass fewer per branch (~9 % of a ViT-S
    encode on CPU); outputs move by float rounding (~1e-6). The state dict then lacks ``ls1`` / ``ls2``: a folded
    model is for running, not for saving."""
    for blk in vit.blocks:
        for ls, lin in ((blk.ls1, blk.attn.proj), (blk.ls2, blk.mlp.fc2)):
            if isinstance(ls, nn.Identity):
                continue
            g = ls.gamma
            lin.weight.mul_(g[:, None])
            if lin.bias is not None:
                lin.bias.mul_(g)
        blk.ls1, blk.ls2 = nn.Identity(), nn.Identity()


def _cls_and_pos(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Prepend the cls token and add the position table (the cls token has its own slot)."""
    cls = vit.cls_token.expand(x.shape[0], -1, -1)
    return torch.cat([cls, x], dim=1) + vit.pos_embed


def _blocks_and_norm(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = vit.norm_pre(x)
    for blk in vit.blocks:
        x = blk(x)
    return vit.norm(x)


def _latent_param(n: int, width: int, *, truncated: bool) -> nn.Parameter:
    """A learned [1, n, width] table, initialised as the official code does (std 0.02; normal or truncated)."""
    p = nn.Parameter(torch.zeros(1, n, width))
    (nn.init.trunc_normal_ if truncated else nn.init.normal_)(p, std=0.02)
    return p


class ViTEncoder(nn.Module):
    """Image [B, 3, H, W] -> the last ``num_latent_tokens`` tokens after the final norm, [B, L, width]."""

    def __init__(self, name: str, *, depth: int | None, image_size: int, patch_size: int, num_latent_tokens: int,
                 drop_path: float = 0.0, layer_scale_init: float = LAYER_SCALE_INIT):
        super().__init__()
        self.model = build_vit(name, depth=depth, image_size=image_size, patch_size=patch_size,
                               drop_path=drop_path, layer_scale_init=layer_scale_init)
        self.width = self.model.embed_dim
        self.num_latent_tokens = int(num_latent_tokens)
        self.latent_tokens = _latent_param(self.num_latent_tokens, self.width, truncated=False)
        self.latent_pos_embed = _latent_param(self.num_latent_tokens, self.width, truncated=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = _cls_and_pos(self.model, self.model.patch_embed(x))
        latents = (self.latent_tokens + self.latent_pos_embed).expand(x.shape[0], -1, -1)
        out = _blocks_and_norm(self.model, torch.cat([tokens, latents], dim=1))
        return out[:, -self.num_latent_tokens:]


class ViTDecoder(nn.Module):
    """Latent tokens already projected to the width, [B, L, width] -> image [B, 3, H, W] (unclamped)."""

    def __init__(self, name: str, *, depth: int | None, image_size: int, patch_size: int, num_latent_tokens: int,
                 drop_path: float = 0.0, layer_scale_init: float = LAYER_SCALE_INIT):
        super().__init__()
        self.model = build_vit(name, depth=depth, image_size=image_size, patch_size=patch_size,
                               drop_path=drop_path, patch_embed=False, layer_scale_init=layer_scale_init)
        self.width = self.model.embed_dim
        self.patch_size = int(patch_size)
        self.grid = image_size // patch_size
        self.num_latent_tokens = int(num_latent_tokens)
        self.mask_token = _latent_param(1, self.width, truncated=False)
        self.latent_pos_embed = _latent_param(self.num_latent_tokens, self.width, truncated=True)
        self.to_pixel = nn.Linear(self.width, 3 * self.patch_size ** 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = self.grid * self.grid
        masks = _cls_and_pos(self.model, self.mask_token.expand(z.shape[0], n, -1))
        x = _blocks_and_norm(self.model, torch.cat([masks, z + self.latent_pos_embed], dim=1))
        return unpatchify(self.to_pixel(x[:, 1:1 + n]), self.patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, N, p*p*3] (per patch: row, col, RGB; patches in raster order on a square grid) -> [B, 3, H, W]."""
    b, n, _ = patches.shape
    g, p = math.isqrt(n), int(patch_size)
    if g * g != n:
        raise TokError(f"{n} patches do not form a square grid")
    x = patches.reshape(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, 3, g * p, g * p)


def dinov2_repo(name: str) -> str:
    """The Hub repo timm loads a DINOv2 name's weights from (``timm/<name>.lvd142m``)."""
    base = str(name).split(".", 1)[0]
    vit_arch(base)
    if base in TOK_ARCHS:
        raise TokError(f"{base} is tok's own ViT width: no DINOv2 weights exist for it (use one of "
                       f"{', '.join(DINOV2_ARCHS)})")
    return f"timm/{base}.lvd142m"


def dinov2_file(name: str):
    """The pretrained-file record (tokcli/core/pretrained.py) of timm's DINOv2 weights for ``name``."""
    from tokcli.core.pretrained import PretrainedFile
    from tokcli.core.registry import hf_env

    repo, (cache, _) = dinov2_repo(name), hf_env()
    folder = Path(cache) if cache else Path.home() / ".cache" / "huggingface" / "hub"
    return PretrainedFile(what=f"the DINOv2 weights of {repo}", name="model.safetensors", folder=folder,
                          hf=(repo, "model.safetensors"), hf_cache=Path(cache) if cache else None, fetch_flag=None)


def load_dinov2(vit: nn.Module, name: str) -> str:
    """Initialise ``vit`` (from :func:`build_vit`) with timm's DINOv2 weights, resampled to its patch size (kernel)
    and grid (position table) by timm's own filter. The file comes from the local Hugging Face cache, and is
    downloaded only when ``TOK_DOWNLOAD=1`` (and no ``HF_HUB_OFFLINE``): the one rule of tokcli/core/pretrained.py.
    A missing file is a :class:`MissingWeightsError` naming it and its ``hf download`` command. Returns its path."""
    from safetensors.torch import load_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    from tokcli.core.pretrained import ensure

    path = ensure(dinov2_file(name))
    state = checkpoint_filter_fn(load_file(path), vit)
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "mask_token"))}
    if isinstance(vit.patch_embed, nn.Identity):
        state = {k: v for k, v in state.items() if not k.startswith("patch_embed.")}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise TokError(f"{path} is not a {name} checkpoint (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return str(path)
