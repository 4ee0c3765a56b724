"""Registry entries for CODA (LeapLabTHU/CODA). Architectures from the official configs (configs/base.py,
mar_16384_config.py) and the VAE constructor defaults that train_mar.py relies on; metrics are the paper's
(ImageNet 256, Tab. 2). This module must stay free of heavy imports: `tok models` reads it.

The release is three files in two Hub repos (base VAE kl16.safetensors in jadechoghari/mar; vae_ema.pth and
quantizer_ema.pth in shuidi0020/CODA/mar_v16384), which `tok convert NAME` cannot fetch as one file yet: download
them into one folder and run `tok convert FOLDER/vae_ema.pth --as coda-mar`.
"""

from tokcli.core.registry import ModelEntry

_MAR_VAE = {"type": "MARAutoencoderKL", "embed_dim": 16, "z_channels": 16, "ch": 128, "ch_mult": [1, 1, 2, 2, 4],
            "num_res_blocks": 2, "attn_resolutions": [16], "decoder_attn_resolutions": [], "resolution": 256,
            "in_channels": 3, "out_ch": 3, "double_z": True, "dropout": 0.0, "resamp_with_conv": True,
            "use_variational": True, "norm_num_groups": 32, "norm_eps": 1e-6}

REGISTRY = [
    ModelEntry(
        name="coda-mar", family="coda",
        model_args={"vae": _MAR_VAE, "vae_latent_channels": 16, "patch_size_list": [1, 2, 3, 4, 5, 6, 8, 10, 13, 16],
                    "codebook_size": 16384, "vq_attn_dim": 32, "vq_norm_type": "rms_norm",
                    "vq_commitment_beta": 0.05, "decoder_lora_rank": 32,
                    "decoder_lora_module_list": ["conv1", "conv2", "upsample", "downsample"],
                    "latent_scale": 0.2325, "latent_shift": 0.0, "image_size": 256},
        description="CODA on the MAR KL-16 VAE: 680 multi-scale tokens of 2^14 (scales 1..16)",
        license="unknown", paper="arXiv:2503.17760",
        paper_metrics={"rFID": 1.43, "PSNR": 22.0, "SSIM": 0.594, "dataset": "ImageNet-val 50k @256"},
        notes="download kl16.safetensors (jadechoghari/mar) and vae_ema.pth + quantizer_ema.pth "
              "(shuidi0020/CODA, mar_v16384/) into one folder, then: tok convert FOLDER/vae_ema.pth --as coda-mar",
    ),
]
