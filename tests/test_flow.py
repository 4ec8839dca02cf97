"""Rectified flow (t2v/flow.py, t2v/objective.py): the time grid and Euler step against diffusers'
FlowMatchEulerDiscreteScheduler on the same inputs, the logit-normal training times, sampling that lands on the
data, and the objective object the step, validation and sampling share."""
from __future__ import annotations

import math

import pytest
import torch

from t2v import config as C
from t2v import diffusion
from t2v import flow
from t2v.objective import DDPM, Flow, build_objective
from t2v.step import step_generator


@pytest.mark.parametrize("shift", [1.0, 3.0, 8.0])
@pytest.mark.parametrize("steps", [1, 5, 25])
def test_time_grid_and_euler_step_match_diffusers(shift, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    # diffusers shifts the sigmas it is given and appends the final 0 itself
    sched.set_timesteps(sigmas=torch.linspace(1.0, 0.0, steps + 1)[:-1].tolist())
    ours = flow.time_grid(steps, shift)
    assert ours == pytest.approx(sched.sigmas.tolist(), abs=1e-6)
    assert torch.allclose(sched.timesteps, torch.tensor(ours[:-1]) * 1000, atol=1e-3)  # the model's time input
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=g)
        theirs = sched.step(v, t, x).prev_sample
        mine = flow.euler_step(v, x, ours[i], ours[i + 1])
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
        x = theirs


def test_the_shift_divides_every_snr_by_shift_squared_like_the_ddpm_shift():
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    snr = ((1 - t) / t) ** 2  # x_t = (1 - t) x0 + t eps
    shifted = flow.shift_time(t, 4.0)
    assert torch.allclose(((1 - shifted) / shifted) ** 2, snr / 16)
    assert torch.equal(flow.shift_time(t, 1.0), t)
    with pytest.raises(ValueError, match="shift must be > 0"):
        flow.shift_time(t, 0.0)


def test_training_times_are_logit_normal_then_shifted():
    g = torch.Generator().manual_seed(0)
    t = flow.training_times(g, 200_000, mean=0.0, std=1.0)
    assert 0 < t.min() and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.005)
    # P(t < sigmoid(1)) = P(u < 1) = Phi(1)
    assert (t < 1 / (1 + math.exp(-1))).float().mean().item() == pytest.approx(0.8413, abs=0.005)
    g = torch.Generator().manual_seed(0)
    shifted = flow.training_times(g, 200_000, mean=0.5, std=1.0, shift=3.0)
    s = 1 / (1 + math.exp(-0.5))  # the median of sigmoid(N(0.5, 1)), shifted
    assert shifted.median().item() == pytest.approx(3 * s / (1 + 2 * s), abs=0.005)


def test_path_target_and_x0_agree():
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(3, 2, 3, 4, 4, generator=g), torch.randn(3, 2, 3, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.3, 1.0])
    x_t = flow.interpolate(x0, eps, t)
    assert torch.equal(x_t[0], x0[0]) and torch.equal(x_t[2], eps[2])
    v = flow.velocity(x0, eps)
    torch.testing.assert_close(flow.predict_x0(x_t, t, v), x0)
    # x_t moves along v: d x_t / dt by finite difference
    h = 1e-3
    torch.testing.assert_close((flow.interpolate(x0, eps, t + h) - x_t) / h, v, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_sampling_with_the_exact_velocity_lands_on_the_data(method):
    """For data that is one clip x0, the velocity at (x_t, t) is (x_t - x0) / t: every sampler must end on x0."""
    x0 = torch.rand(2, 3, 3, 4, 4) * 2 - 1
    calls = []

    def exact(x_t, model_t):
        calls.append(model_t[0].item())
        t = (model_t / 1000).reshape(-1, 1, 1, 1, 1)
        return (x_t - x0) / t

    out = flow.sample_loop(exact, x0.shape, steps=6, shift=3.0, method=method, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, rtol=1e-5, atol=1e-5)
    assert len(calls) == (6 if method == "euler" else 11) and calls[0] == pytest.approx(1000.0)


def test_clipping_changes_only_what_overshoots():
    x_t = torch.randn(2, 1, 3, 4, 4)
    t = torch.tensor([0.5, 0.9])
    v = torch.zeros_like(x_t)
    v[0] = x_t[0] / 0.5  # x0 = 0 for the first clip: in range, untouched
    v[1] = (x_t[1] - 3.0) / 0.9  # x0 = 3 for the second: clipped to 1
    clipped = flow.clip_velocity(x_t, t, v)
    assert torch.equal(clipped[0], v[0])
    torch.testing.assert_close(flow.predict_x0(x_t, t, clipped)[1], torch.ones_like(x_t[1]))


def test_the_sampler_is_deterministic_and_refuses_unknown_methods():
    run = lambda: flow.sample_loop(lambda x, t: 0.1 * x, (1, 2, 3, 4, 4), steps=3,  # noqa: E731
                                   generator=torch.Generator().manual_seed(5))
    assert torch.equal(run(), run())
    with pytest.raises(ValueError, match="unknown flow sampling method 'ddim'"):
        flow.sample_loop(lambda x, t: x, (1, 1, 3, 4, 4), method="ddim")
    with pytest.raises(ValueError, match="eta is a DDIM setting"):
        Flow().sample(lambda x, t: x, (1, 1, 3, 4, 4), 2, eta=0.5)


def test_the_ddpm_objective_draws_what_the_step_always_drew():
    """Every ddpm run and config resumes unchanged: the same timesteps from the step's generator."""
    obj = build_objective(C.DiffusionConfig(), "cpu")
    assert isinstance(obj, DDPM) and obj.methods[0] == "ddim"
    g1, g2 = step_generator(3, 17, torch.device("cpu")), step_generator(3, 17, torch.device("cpu"))
    assert torch.equal(obj.draw_times(g1, 8, "cpu"), torch.randint(0, 1000, (8,), generator=g2))
    x0, eps = torch.randn(2, 1, 3, 4, 4), torch.randn(2, 1, 3, 4, 4)
    t = torch.tensor([10, 900])
    s = diffusion.make_schedule(1000)
    assert torch.equal(obj.noisy(x0, eps, t), diffusion.q_sample(s, x0, t, eps))
    assert torch.equal(obj.model_time(t), t)


def test_the_flow_objective_from_the_config():
    cfg = C.load_config(None, ["diffusion.objective=flow", "diffusion.shift=3", "diffusion.logit_mean=-0.5"], env={})
    obj = build_objective(cfg.diffusion)
    assert obj == Flow(1000, 3.0, -0.5, 1.0) and obj.methods == ("euler", "heun", "unipc")
    t = obj.fixed_times(500, 2, "cpu")
    assert t.tolist() == [0.5, 0.5] and obj.model_time(t).tolist() == [500.0, 500.0]  # validation's t500: the midpoint
    g = step_generator(0, 0, torch.device("cpu"))
    drawn = obj.draw_times(g, 4, "cpu")
    assert drawn.dtype == torch.float32 and ((0 < drawn) & (drawn < 1)).all() and obj.weight(drawn) is None


@pytest.mark.parametrize("override, message", [
    ("diffusion.objective=score", "diffusion.objective must be one of ddpm, flow, got 'score'"),
    ("diffusion.logit_std=0", "diffusion.logit_std must be > 0"),
])
def test_bad_objective_settings_name_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(None, [override], env={})


@pytest.mark.parametrize("override, message", [
    ("diffusion.snr_gamma=5", "diffusion.snr_gamma applies to diffusion.objective=ddpm only"),
    ("diffusion.prediction=v", "diffusion.prediction applies to diffusion.objective=ddpm only"),
])
def test_ddpm_only_settings_are_refused_with_flow(override, message):
    with pytest.raises(C.ConfigError, match=message):
        C.load_config(None, ["diffusion.objective=flow", override], env={})
