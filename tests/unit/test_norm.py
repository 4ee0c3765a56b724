"""GroupNorm in channels-last memory: tok's group_norm is exact to rounding where PyTorch's kernel is not."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tokcli.nn.norm import GroupNorm, accurate_group_norms, group_norm


@pytest.mark.parametrize("shape, mean", [((2, 64, 32, 32), 10.0), ((1, 32, 16, 24), 100.0), ((3, 128, 8, 8), 0.0)])
def test_channels_last_group_norm_matches_float64(shape, mean):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 0.5 + mean
    w, b = torch.randn(shape[1], generator=g), torch.randn(shape[1], generator=g)
    ref = F.group_norm(x.double(), 32, w.double(), b.double(), 1e-6)
    cl = x.contiguous(memory_format=torch.channels_last)
    y = group_norm(cl, 32, w, b, 1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.float32
    assert (y.double() - ref).abs().max().item() < 3e-5 * (1 + mean / 10)
    assert torch.equal(group_norm(x, 32, w, b, 1e-6), F.group_norm(x, 32, w, b, 1e-6))  # contiguous: PyTorch's
    assert (group_norm(cl, 32, eps=1e-6).double() - F.group_norm(x.double(), 32, eps=1e-6)).abs().max() < 3e-5 * (
        1 + mean / 10)


def test_modules_are_swapped_in_place_keeping_their_weights():
    net = nn.Sequential(nn.Conv2d(3, 32, 1), nn.GroupNorm(8, 32, eps=1e-6))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    accurate_group_norms(net)
    assert type(net[1]) is GroupNorm and net[1].num_groups == 8 and net[1].eps == 1e-6
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    x = torch.randn(2, 3, 8, 8) + 5
    with torch.no_grad():
        a = net(x)
        b = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert (a - b).abs().max().item() < 1e-5
