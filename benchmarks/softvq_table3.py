"""The direction of SoftVQ-VAE's Table 3 at small scale: the same small ViT encoder / decoder and data, three
bottlenecks on the L latent tokens of d floats, for two token counts.

    python benchmarks/softvq_table3.py --steps 600 --json benchmarks/results/softvq_table3.json

- ``softvq``: the soft vector quantizer (softmax(cos / tau) @ codebook, tokcli.quant.softvq) + 0.01 x entropy;
- ``vq``: plain nearest-neighbour VQ with the straight-through estimator (tokcli.quant.vq.VectorQuantizer,
  codebook + 0.25 x commitment loss), the same codebook size;
- ``ae``: no quantizer (the continuous latent goes to the decoder as it is).

Model: ViT blocks of width 192 (``tok_vit_tiny``; ``--vit`` for a DINOv2 width), depth 2 in the encoder and 2 in
the decoder, LayerScale initialised at 0.1 (DINOv2's 1e-5 leaves a short run near the mean image), 64 px, patch 8,
one codebook of 1024. Training: L2 + 0.2 x L1, Adam (0.9, 0.95) lr 4e-4 with cosine decay, grad clip 1.0, batch 16 of 64 px random crops
of data/train (scripts/build_dataset.py), the same seed for every run. Evaluation: data/heldout, ADM centre crop at
64 px plus the four 64 px tiles of the 128 px centre crop (uint8 PSNR / SSIM, tok bench's protocol); usage: the
fraction of codes that are the argmax (SoftVQ) or nearest code (VQ) of at least one token of the evaluation set.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokcli.core.images import collect_inputs, load_cropped, to_uint8  # noqa: E402
from tokcli.families.softvq.model import SoftVQ  # noqa: E402
from tokcli.metrics.image import psnr, ssim  # noqa: E402
from tokcli.quant.base import QuantOut  # noqa: E402
from tokcli.quant.vq import VectorQuantizer  # noqa: E402
from tokcli.train.data import make_data  # noqa: E402
from tokcli.train.recipe import recipe_from_dict  # noqa: E402


class TokenVQ(nn.Module):
    """VectorQuantizer on token sequences [B, L, d] (it wants channels on axis 1)."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.vq = VectorQuantizer(dim, size)

    def forward(self, z_hat):
        q = self.vq(z_hat.transpose(1, 2))
        return QuantOut(q.quantized.transpose(1, 2), q.ids, losses={"vq": sum(q.losses.values())})


class Identity(nn.Module):
    def forward(self, z_hat):
        return QuantOut(z_hat, None)


def build(kind: str, tokens: int, dim: int, codes: int, depth: int, vit: str = "tok_vit_tiny",
          layer_scale: float = 0.1) -> SoftVQ:
    model = SoftVQ(encoder_model=vit, decoder_model=vit, encoder_depth=depth, decoder_depth=depth, image_size=64,
                   enc_patch_size=8, dec_patch_size=8, num_latent_tokens=tokens, codebook_embed_dim=dim,
                   codebook_size=codes, num_codebooks=1, layer_scale_init=layer_scale)
    if kind == "vq":
        model.quantize = TokenVQ(dim, codes)
    elif kind == "ae":
        model.quantize = Identity()
    return model


def train_one(model: SoftVQ, data, steps: int, lr: float) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.95))
    batches = data.batches(start=0)
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x = next(batches)
        recon, aux = model(x)
        loss = F.mse_loss(recon, x) + 0.2 * (recon - x).abs().mean()
        loss = loss + 0.01 * aux.get("entropy", 0.0) + aux.get("vq", 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return time.perf_counter() - t0


def eval_images(folder: str) -> torch.Tensor:
    """uint8-exact [-1, 1] images: each held-out photo's 64 px centre crop and the tiles of its 128 px one."""
    out = []
    for item in collect_inputs([folder]):
        out.append(load_cropped(item, 64))
        big = load_cropped(item, 128)
        out += [big[i:i + 64, j:j + 64] for i in (0, 64) for j in (0, 64)]
    arr = np.stack(out).astype(np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def evaluate(model: SoftVQ, x: torch.Tensor, codes: int) -> dict:
    model.eval()
    q = model.quantize(model.encode_hat(x))
    recon = model.decode_latents(q.quantized).clamp(-1, 1)
    a, b = to_uint8(x), to_uint8(recon)
    usage = None if q.ids is None else round(len(torch.unique(q.ids)) / codes, 4)
    return {"psnr": round(float(np.mean(psnr(a, b))), 3), "ssim": round(float(np.mean(ssim(a, b))), 4),
            "usage": usage}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--tokens", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--codes", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--vit", default="tok_vit_tiny", help="block width: tok_vit_tiny (192) or a DINOv2 name")
    ap.add_argument("--layer-scale-init", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--train", default="data/train")
    ap.add_argument("--heldout", default="data/heldout")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    recipe = recipe_from_dict({"model": {"family": "softvq"},
                               "data": {"roots": [a.train], "crop_size": 64, "random_resize": [1.0, 4.0],
                                        "batch_size": 16, "hflip": True}})
    x_eval, data = eval_images(a.heldout), make_data("images", recipe)
    rows = []
    for tokens in a.tokens:
        for kind in ("softvq", "vq", "ae"):
            torch.manual_seed(0)
            model = build(kind, tokens, a.dim, a.codes, a.depth, a.vit, a.layer_scale_init)
            seconds = train_one(model, data, a.steps, a.lr)
            row = {"bottleneck": kind, "tokens": tokens, "dim": a.dim, "floats": tokens * a.dim,
                   "steps": a.steps, "train_s": round(seconds, 1), **evaluate(model, x_eval, a.codes)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"images": int(x_eval.shape[0]), "codes": a.codes, "depth": a.depth, "vit": a.vit,
              "layer_scale_init": a.layer_scale_init, "rows": rows}
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("| bottleneck | L x d | PSNR | SSIM | usage |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bottleneck']} | {r['tokens']} x {r['dim']} | {r['psnr']} | {r['ssim']} | {r['usage']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
