"""Nearest 2x upsample + 3x3 conv computed at low resolution: the same map (float64 reference), both layouts, and a
diffusers AutoencoderKL decoder with its Upsample2D swapped decodes the same images."""

import pytest
import torch
import torch.nn.functional as F

from tokcli.nn.phase_upsample import PhaseUpsample, phase_upsamplers, phase_weights


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("hw", [(5, 7), (8, 8), (1, 3)])
def test_phase_upsample_is_upsample_then_conv(layout, hw):
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, *hw, generator=g).contiguous(memory_format=layout)
    ref = F.conv2d(F.interpolate(x.double(), scale_factor=2.0, mode="nearest"), conv.weight.double(),
                   conv.bias.double(), padding=1)
    with torch.no_grad():
        y = PhaseUpsample(conv)(x)
    assert y.shape == ref.shape and (y.double() - ref).abs().max().item() < 1e-5
    assert y.is_contiguous(memory_format=layout)


def test_phase_weights_sum_the_taps():
    w = torch.arange(9.0).view(1, 1, 3, 3)  # rows k0=[0,1,2], k1=[3,4,5], k2=[6,7,8]
    p = phase_weights(w)
    assert p.shape == (4, 1, 2, 2)
    # phase (0, 0): rows (k0, k1+k2) x cols (c0, c1+c2)
    assert p[0, 0].tolist() == [[0.0, 1 + 2], [3 + 6, 4 + 5 + 7 + 8]]
    # phase (1, 1): rows (k0+k1, k2) x cols (c0+c1, c2)
    assert p[3, 0].tolist() == [[0 + 1 + 3 + 4, 2 + 5], [6 + 7, 8.0]]
    assert float(p.sum()) == 4 * float(w.sum())  # every tap used once per phase


def test_a_diffusers_decoder_decodes_the_same_after_the_swap():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8).eval()
    z = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        before = vae.decode(z).sample
        assert phase_upsamplers(vae) == 1
        after = vae.decode(z).sample
    assert (before - after).abs().max().item() < 1e-5
