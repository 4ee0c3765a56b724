"""Registry entries for CODA (LeapLabTHU/CODA). Architectures from the official configs (configs/base.py,
mar_16384_config.py, flux_65536_config.py), the VAE constructor defaults that train_mar.py relies on, and the FLUX.1
``vae/config.json``; metrics are the paper's (ImageNet 256, Tab. 2). This module must stay free of heavy imports:
`tok models` reads it.

Each release spans several Hub files, all fetched by `tok convert NAME` (``extra_hub_files``):

- coda-mar: ``vae_ema.pth`` + ``quantizer_ema.pth`` (shuidi0020/CODA, ``mar_v16384/``) on the MAR KL-16 VAE
  ``kl16.safetensors`` (jadechoghari/mar, MIT).
- coda-flux: ``vae_ema.pth`` + ``quantizer_ema.pth`` (shuidi0020/CODA, ``flux_v65536/``) on the FLUX.1 VAE, the
  diffusers ``vae/`` folder. The official README points at FLUX.1-dev (gated; FLUX.1 [dev] Non-Commercial License);
  tok defaults to FLUX.1-schnell's (Apache-2.0), which has the same architecture and config.json and is reported to
  hold the same VAE weights. A FLUX.1-dev ``vae/`` folder is accepted as well (``tok convert FOLDER/vae_ema.pth
  --as coda-flux`` with it in ``FOLDER/vae/``); the converted model card records which base was used and its licence.

The EMA files are the ones the official evaluation uses; the raw ``vae.pth`` / ``quantizer.pth`` are refused.
"""

from tokcli.core.entry import ModelEntry

_CODA_REPO = "shuidi0020/CODA"
_PAPER = "arXiv:2503.17760"
FLUX_VAE_REPO = "black-forest-labs/FLUX.1-schnell"

_MAR_VAE = {"type": "MARAutoencoderKL", "embed_dim": 16, "z_channels": 16, "ch": 128, "ch_mult": [1, 1, 2, 2, 4],
            "num_res_blocks": 2, "attn_resolutions": [16], "decoder_attn_resolutions": [], "resolution": 256,
            "in_channels": 3, "out_ch": 3, "double_z": True, "dropout": 0.0, "resamp_with_conv": True,
            "use_variational": True, "norm_num_groups": 32, "norm_eps": 1e-6}

# the FLUX.1 vae/config.json as tokcli.nn.klvae.vae_block_from_diffusers_config reads it (diffusers key names)
_FLUX_VAE = {"type": "AutoencoderKL", "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2,
             "attn_resolutions": [], "decoder_attn_resolutions": [], "resolution": 1024, "z_channels": 16,
             "embed_dim": 16, "in_channels": 3, "out_ch": 3, "double_z": True, "dropout": 0.0,
             "resamp_with_conv": True, "use_variational": True, "norm_num_groups": 32, "norm_eps": 1e-6,
             "use_quant_conv": False, "use_post_quant_conv": False}

_QUANT = {"vae_latent_channels": 16, "vq_attn_dim": 32, "vq_norm_type": "rms_norm", "vq_commitment_beta": 0.05,
          "decoder_lora_rank": 32, "image_size": 256}

REGISTRY = [
    ModelEntry(
        name="coda-tiny", family="coda", shipped=True, license="other",
        description="demo CODA on kl-tiny (LoRA rank 8, 680 tokens of 2^10 at 128 px) trained by tok on CPU on 32 "
                    "openly licensed photos",
        notes="see tokcli/weights/coda-tiny/README.md for data, training and measured quality; licence: "
              "other (trained on CC-BY, CC-BY-SA, GPL-2+, CC0 and public-domain photos, listed in the card)",
    ),
    ModelEntry(
        name="coda-mar", family="coda",
        model_args={"vae": _MAR_VAE, **_QUANT, "patch_size_list": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
                    "codebook_size": 16384, "decoder_lora_module_list": ["conv1", "conv2", "upsample", "downsample"],
                    "latent_scale": 0.2325, "latent_shift": 0.0},
        description="CODA on the MAR KL-16 VAE: 680 multi-scale tokens of 2^14 (scales 1..16)",
        hub_repo=_CODA_REPO, hub_filename="mar_v16384/vae_ema.pth",
        extra_hub_files=(
            {"repo": _CODA_REPO, "filename": "mar_v16384/quantizer_ema.pth", "role": "quantizer"},
            {"repo": "jadechoghari/mar", "filename": "kl16.safetensors", "role": "base_vae"},
        ),
        license="unknown", paper=_PAPER,
        paper_metrics={"rFID": 1.43, "PSNR": 22.0, "SSIM": 0.594, "dataset": "ImageNet-val 50k @256"},
        notes="tok convert coda-mar fetches vae_ema.pth + quantizer_ema.pth (shuidi0020/CODA, mar_v16384/) and the "
              "base VAE kl16.safetensors (jadechoghari/mar, MIT); with local copies in one folder: "
              "tok convert FOLDER/vae_ema.pth --as coda-mar",
    ),
    ModelEntry(
        name="coda-flux", family="coda",
        model_args={"vae": _FLUX_VAE, **_QUANT, "patch_size_list": [1, 2, 3, 4, 6, 9, 13, 18, 24, 32],
                    "codebook_size": 65536, "decoder_lora_module_list": ["conv1", "conv2"],
                    "latent_scale": 0.3611, "latent_shift": 0.1159},
        description="CODA on the FLUX.1 VAE: 2240 multi-scale tokens of 2^16 (scales 1..32)",
        hub_repo=_CODA_REPO, hub_filename="flux_v65536/vae_ema.pth",
        extra_hub_files=(
            {"repo": _CODA_REPO, "filename": "flux_v65536/quantizer_ema.pth", "role": "quantizer"},
            {"repo": FLUX_VAE_REPO, "filename": "vae/config.json", "role": "base_vae_config",
             "local": "vae/config.json"},
            {"repo": FLUX_VAE_REPO, "filename": "vae/diffusion_pytorch_model.safetensors", "role": "base_vae",
             "local": "vae/diffusion_pytorch_model.safetensors"},
        ),
        license="unknown", paper=_PAPER,
        paper_metrics={"rFID": 0.43, "PSNR": 25.9, "SSIM": 0.771, "dataset": "ImageNet-val 50k @256"},
        notes="tok convert coda-flux fetches vae_ema.pth + quantizer_ema.pth (shuidi0020/CODA, flux_v65536/) and the "
              "FLUX.1-schnell VAE (black-forest-labs/FLUX.1-schnell vae/, Apache-2.0). The official README uses the "
              "FLUX.1-dev VAE (gated, FLUX.1 [dev] Non-Commercial License): same architecture, reported identical "
              "weights; to use it, put vae_ema.pth, quantizer_ema.pth and its vae/ folder in one folder and run "
              "tok convert FOLDER/vae_ema.pth --as coda-flux (the model card records the base and its licence)",
    ),
]
