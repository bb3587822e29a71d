import pytest
import torch

from omni_ep.pipelines.hunyuan_image3.scheduling import (
    distilled_guidance,
    flow_match_sigmas,
    make_scheduler,
    meanflow_timesteps_r,
)

pytestmark = pytest.mark.timeout(60)


def test_sigmas_known_numbers():
    # linspace(1, 0, 5) = 1, .75, .5, .25, 0 -> 3s / (1 + 2s) = 1, .9, .75, .5, 0
    torch.testing.assert_close(flow_match_sigmas(4), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]), rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        flow_match_sigmas(0)


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_diffusers_scheduler_matches_formula_and_euler_step(steps):
    sigmas = flow_match_sigmas(steps)
    scheduler, timesteps = make_scheduler(steps)
    assert timesteps.shape == (steps,)
    torch.testing.assert_close(scheduler.sigmas.float(), sigmas, rtol=0, atol=1e-6)
    torch.testing.assert_close(timesteps.float(), sigmas[:-1] * 1000, rtol=0, atol=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 3, generator=gen)
    for i, t in enumerate(timesteps):
        v = torch.randn(x.shape, generator=gen)
        expect = x + v * (sigmas[i + 1] - sigmas[i])
        x = scheduler.step(v, t, x).prev_sample
        torch.testing.assert_close(x, expect, rtol=0, atol=1e-6)


def test_plain_set_timesteps_differs():
    from diffusers import FlowMatchEulerDiscreteScheduler

    plain = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain.set_timesteps(50)
    assert (plain.sigmas.float() - flow_match_sigmas(50)).abs().max() > 1e-4


def test_instruct_distil_eight_steps_and_meanflow_r():
    """N = 8, shift 3: 1000 * sigma = 1000, 954.545, 900, 833.333, 750, 642.857, 500, 300, 0; r_i = t_{i+1}, 0 last."""
    sigmas_x1000 = [1000.0, 10500 / 11, 900.0, 2500 / 3, 750.0, 4500 / 7, 500.0, 300.0, 0.0]
    torch.testing.assert_close(flow_match_sigmas(8) * 1000, torch.tensor(sigmas_x1000), rtol=0, atol=2e-4)
    _, timesteps = make_scheduler(8)
    torch.testing.assert_close(timesteps, torch.tensor(sigmas_x1000[:-1]), rtol=0, atol=2e-4)
    r = meanflow_timesteps_r(timesteps)
    assert r.dtype == torch.float32 and r[-1] == 0 and torch.equal(r[:-1], timesteps[1:])
    torch.testing.assert_close(r, torch.tensor(sigmas_x1000[1:]), rtol=0, atol=2e-4)


@pytest.mark.parametrize("g, expected", [(2.5, 2496.0), (3.0, 3008.0), (5.0, 4992.0), (4.0, 4000.0), (1.0, 1000.0)])
def test_distilled_guidance_is_1000_g_in_bfloat16(g, expected):
    value = distilled_guidance(g)
    assert value.dtype == torch.float32 and value.dim() == 0 and value.item() == expected
