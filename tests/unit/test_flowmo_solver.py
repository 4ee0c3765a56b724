"""FlowMo's ``solver`` decode keyword (tokcli/families/flowmo/sampler.py): Heun's predictor-corrector on the official
grid integrates a velocity linear in t exactly up to its Euler last step, is second order where Euler is first, runs
CFG batched exactly as with two calls, counts its decoder calls right, and bad values are refused in one line."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FLOWMO_TINY
from tokcli.errors import TokUsageError

TINY = FLOWMO_TINY


@pytest.fixture(scope="module")
def tiny(tiny_flowmo):
    return tiny_flowmo


@pytest.fixture(scope="module")
def ids(flowmo_ids):
    return flowmo_ids


def _z(b=2):
    return torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def test_heun_is_exact_for_a_velocity_linear_in_t_up_to_the_euler_last_step():
    from tokcli.families.flowmo.sampler import sample, time_grid

    a, b = 0.7, -2.5  # v(t) = a + b t, so z(0) = z(1) - (a + b / 2)
    z1 = _z()
    for steps, schedule in ((4, "pow_0.25"), (7, "linear"), (25, "pow_0.25")):
        out = sample(lambda z, t, c: torch.full_like(z, a) + b * t[:, None, None, None].to(z.dtype), z1,
                     torch.zeros(2, 1, 1), steps=steps, schedule=schedule, solver="heun")
        t_last = float(time_grid(steps, schedule)[0][-1])
        # trapezoid steps are exact; the final Euler step to t = 0 misses b * t_last**2 / 2 of the integral
        expected = z1 - (a + b / 2) - b * t_last ** 2 / 2
        assert float((out - expected).abs().max()) < 1e-5


def test_heun_is_second_order_and_euler_first_order():
    from tokcli.families.flowmo.sampler import sample

    lam = 1.3  # dz/dt = lam z  ->  z(0) = z(1) exp(-lam)
    z1 = _z()
    exact = z1 * math.exp(-lam)

    def err(solver, n):
        out = sample(lambda z, t, c: lam * z, z1, torch.zeros(2, 1, 1), steps=n, schedule="linear",
                     solver=solver)
        return float((out - exact).abs().max())

    e_ratio = err("euler", 16) / err("euler", 32)
    h_ratio = err("heun", 16) / err("heun", 32)
    assert 1.8 < e_ratio < 2.2 and 3.5 < h_ratio < 4.5
    assert err("heun", 8) < err("euler", 8) / 5


@pytest.mark.parametrize("interval", [[0.17, 1.02], "all"])
def test_heun_batched_cfg_equals_two_calls(tiny, ids, interval):
    from tokcli.families.flowmo.sampler import make_noise, sample

    cond = tiny.condition(tiny.codes_from_ids(ids))
    z0 = make_noise([5, 6, 7], (3, 16, 16), "cpu")
    with torch.inference_mode():
        kw = dict(steps=6, cfg=1.5, cfg_interval=interval, solver="heun")
        one = sample(tiny.velocity, z0, cond, batched_cfg=True, **kw)
        two = sample(tiny.velocity, z0, cond, batched_cfg=False, **kw)
        unguided = sample(tiny.velocity, z0, cond, steps=6, cfg=1.0, solver="heun")
    assert float((one - two).abs().max()) < 1e-5
    assert float((one - unguided).abs().max()) > 1e-4  # guidance did act


@pytest.mark.parametrize("steps,cfg,interval,schedule", [(25, 1.5, [0.17, 1.02], "pow_0.25"), (4, 1.5, "all", "linear"),
                                                         (8, 1.0, [0.17, 1.02], "pow_0.25"), (1, 2.0, "all", "linear")])
@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_decoder_calls_counts_what_the_sampler_does(steps, cfg, interval, schedule, solver):
    from tokcli.families.flowmo.sampler import decoder_calls, sample

    for batched in (True, False):
        calls = []

        def v(z, t, c):
            calls.append(z.shape[0])
            return z * 0.1

        sample(v, _z(1), torch.zeros(1, 1, 1), steps=steps, cfg=cfg, cfg_interval=interval, schedule=schedule,
               solver=solver, batched_cfg=batched)
        assert decoder_calls(steps, cfg, interval, solver, schedule, batched_cfg=batched) == len(calls)
        if not batched:  # passes per image as the official code counts them
            assert sum(calls) == len(calls)


def test_official_pass_counts():
    from tokcli.families.flowmo.sampler import decoder_calls

    assert decoder_calls(25, 1.5, [0.17, 1.02], "euler", batched_cfg=False) == 31  # the paper's 25 + 6
    assert decoder_calls(25, 1.5, [0.17, 1.02], "euler") == 25
    assert decoder_calls(25, 1.5, [0.17, 1.02], "heun", batched_cfg=False) == 2 * 31 - 1
    assert decoder_calls(8, 1.0, None, "heun") == 15


def test_solver_through_decode_defaults_and_replay(tiny, ids):
    from tokcli.families.flowmo.sampler import make_noise

    z0 = make_noise([0, 1, 2], (3, 16, 16), "cpu")
    with torch.inference_mode():
        default = tiny.decode(ids, noise=z0, steps=3, clamp=False)
        euler = tiny.decode(ids, noise=z0, steps=3, solver="euler", clamp=False)
        heun = tiny.decode(ids, noise=z0, steps=3, solver="heun", clamp=False)
        heun_seeded = tiny.decode(ids, seed=0, steps=3, solver="heun", clamp=False)
        saved = dict(tiny.decode_defaults)
        try:
            tiny.decode_defaults["solver"] = "heun"  # a folder's config.json `decode` default
            from_folder_default = tiny.decode(ids, noise=z0, steps=3, clamp=False)
            overridden = tiny.decode(ids, noise=z0, steps=3, solver="euler", clamp=False)
        finally:
            tiny.decode_defaults = saved
    assert torch.equal(default, euler) and torch.equal(heun, heun_seeded)
    assert torch.equal(from_folder_default, heun) and torch.equal(overridden, euler)
    assert float((heun - euler).abs().max()) > 1e-4


@pytest.mark.parametrize("kw,msg", [({"solver": "rk4"}, "unknown FlowMo sampler solver 'rk4'"),
                                    ({"solver": 2}, "unknown FlowMo sampler solver"),
                                    ({"solver": "heun", "steps": 0}, "positive integer"),
                                    ({"solver": "heun", "steps": 1.5}, "positive integer")])
def test_bad_solver_or_steps_is_one_usage_line(tiny, ids, kw, msg):
    with pytest.raises(TokUsageError, match=msg) as e:
        tiny.decode(ids, seed=0, **kw)
    assert "\n" not in str(e.value)
