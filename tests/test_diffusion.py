"""Diffusion math against closed forms computed here, independently of t2v.diffusion."""
import math

import pytest
import torch

from t2v import diffusion as D

T = 1000


@pytest.fixture(scope="module")
def s():
    return D.make_schedule(T, "cosine")


def cosine_f(t, s=0.008):
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


def test_cosine_schedule(s):
    acp = s.alphas_cumprod
    assert s.num_timesteps == T
    assert all(getattr(s, name).dtype == torch.float32 and getattr(s, name).shape == (T,) for name in s.__dataclass_fields__)
    assert acp[0] > 0.9999
    assert (acp[1:] < acp[:-1]).all()
    assert acp[-1] < 1e-6
    assert (s.betas <= 0.999).all() and (s.betas > 0).all()
    assert s.betas[-1] == pytest.approx(0.999)  # the clip is what bounds the last step
    # ᾱ after step i (0-based) is f(i + 1) / f(0) wherever the clip did not act
    for i in (0, 10, 250, 500, 900, 990):
        assert acp[i].item() == pytest.approx(cosine_f(i + 1) / cosine_f(0), rel=1e-5, abs=1e-7)
    assert torch.allclose(s.alphas_cumprod_prev[1:], acp[:-1]) and s.alphas_cumprod_prev[0] == 1
    assert torch.allclose(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, torch.ones(T))


def test_linear_schedule():
    lin = D.make_schedule(T, "linear")
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    # rescaled for shorter schedules so ᾱ_T stays near zero
    short = D.make_schedule(100, "linear")
    assert short.betas[-1].item() == pytest.approx(0.2) and short.alphas_cumprod[-1] < 1e-3
    with pytest.raises(ValueError):
        D.make_schedule(10, "quadratic")


def test_extract_shape_and_values(s):
    t = torch.tensor([0, 5, 999])
    out = D.extract(s.betas, t, 5)
    assert out.shape == (3, 1, 1, 1, 1)
    assert torch.equal(out.flatten(), s.betas[t])
    assert D.extract(s.betas, t, 2).shape == (3, 1)


def test_schedule_to_keeps_values(s):
    moved = s.to("cpu")
    assert moved.num_timesteps == T and torch.equal(moved.posterior_variance, s.posterior_variance)


@pytest.mark.parametrize("t_int", [50, 400, 800])
def test_q_sample_statistics(s, t_int):
    g = torch.Generator().manual_seed(0)
    n, c = 200_000, 0.7
    x0 = torch.full((n, 1, 1, 1, 1), c)
    t = torch.full((n,), t_int)
    xt = D.q_sample(s, x0, t, torch.randn(x0.shape, generator=g))
    acp = s.alphas_cumprod[t_int].item()
    # standard error of the mean is ~1/sqrt(n) = 0.0022; of the std, ~0.0016
    assert xt.mean().item() == pytest.approx(math.sqrt(acp) * c, abs=0.01)
    assert xt.std().item() == pytest.approx(math.sqrt(1 - acp), abs=0.01)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_targets_invert_exactly(s, prediction):
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 8, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    # eps -> x0 divides by sqrt(ᾱ_t), which is ~1e-3 at the very end; stay where float32 is exact enough
    hi = 900 if prediction == "eps" else T
    t = torch.tensor([0, 1, hi // 2, hi - 1])
    xt = D.q_sample(s, x0, t, noise)
    target = D.training_target(s, x0, noise, t, prediction)
    if prediction == "v":
        a, b = s.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1, 1), s.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1, 1)
        assert torch.allclose(target, a * noise - b * x0)
    else:
        assert torch.equal(target, noise)
    assert (D.predict_x0(s, xt, t, target, prediction) - x0).abs().max() < 1e-5
    assert (D.predict_eps(s, xt, t, target, prediction) - noise).abs().max() < 1e-5
    clipped = D.predict_x0(s, xt, t, target * 50, prediction, clip=True)
    assert clipped.min() >= -1 and clipped.max() <= 1


def test_training_loss_is_mse():
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    assert D.training_loss(a, b).item() == pytest.approx(((a - b) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError):
        D.training_target(D.make_schedule(10), a, b, torch.zeros(2, dtype=torch.long), "x0")


def test_posterior_matches_ho_eq7(s):
    betas = s.betas.double()
    alphas = 1 - betas
    ab = torch.cumprod(alphas, 0)
    ab_prev = torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(5, 2, 3, 4, 4, generator=g)
    xt = torch.randn(5, 2, 3, 4, 4, generator=g)
    t = torch.tensor([0, 1, 10, 500, 999])
    mean, var, log_var = D.q_posterior(s, x0, xt, t)
    assert mean.shape == x0.shape and var.shape == (5, 1, 1, 1, 1)
    view = lambda v: v[t].view(-1, 1, 1, 1, 1)  # noqa: E731
    mu = view(ab_prev.sqrt() * betas / (1 - ab)) * x0.double() + view(alphas.sqrt() * (1 - ab_prev) / (1 - ab)) * xt.double()
    beta_tilde = (1 - ab_prev) / (1 - ab) * betas
    assert torch.allclose(mean.double(), mu, atol=1e-5)
    assert torch.allclose(var.double(), view(beta_tilde), rtol=1e-5, atol=1e-12)
    assert var[0].item() == 0  # no noise is added on the last step
    # log variance is clipped at t = 0 to the t = 1 value rather than log(0)
    assert log_var[0].item() == pytest.approx(math.log(beta_tilde[1].item()), rel=1e-5)
    assert log_var[3].item() == pytest.approx(math.log(beta_tilde[500].item()), rel=1e-5)


def test_ddim_timesteps():
    ts = D.ddim_timesteps(1000, 50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:])) and all(isinstance(x, int) for x in ts)
    assert D.ddim_timesteps(10, 10) == list(range(9, -1, -1))
    assert D.ddim_timesteps(1000, 1) == [999]
    for steps in (2, 3, 7, 333, 999):
        ts = D.ddim_timesteps(1000, steps)
        assert len(set(ts)) == steps and ts[0] == 999 and ts[-1] == 0
    for bad in (0, 1001):
        with pytest.raises(ValueError):
            D.ddim_timesteps(1000, bad)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ddim_eta0_with_true_target_is_exact(s, prediction, dtype):
    """With the true noise, each deterministic DDIM step lands exactly on q_sample(x0, t_prev, noise)."""
    g = torch.Generator().manual_seed(3)
    x0 = (torch.rand(2, 4, 3, 8, 8, generator=g) * 1.8 - 0.9).to(dtype)
    noise = torch.randn(x0.shape, generator=g).to(dtype)
    ts = D.ddim_timesteps(T, 20)
    if dtype == torch.float32:
        # at t = 999 sqrt(ᾱ) = 5e-5: x0's share of a float32 x_t is below its rounding error (~4e-3
        # of x0 is lost in x_t itself), so the float32 chain starts where x_t still holds x0
        ts = [t for t in ts if t <= 900]
    x = D.q_sample(s, x0, torch.full((2,), ts[0]), noise)
    for t_int, prev in zip(ts, ts[1:] + [-1]):
        t, t_prev = torch.full((2,), t_int), torch.full((2,), prev)
        x = D.ddim_step(s, D.training_target(s, x0, noise, t, prediction), x, t, t_prev, prediction, eta=0.0)
        if prev >= 0:
            assert (x - D.q_sample(s, x0, t_prev, noise)).abs().max() < 1e-5
    assert x.dtype == dtype
    assert (x - x0).abs().max() < 1e-5


def test_ddpm_step_adds_no_noise_at_t0(s):
    x0 = torch.rand(2, 2, 3, 4, 4) * 2 - 1
    noise = torch.randn(x0.shape)
    t = torch.zeros(2, dtype=torch.long)
    xt = D.q_sample(s, x0, t, noise)
    a = D.ddpm_step(s, noise, xt, t, generator=torch.Generator().manual_seed(0))
    b = D.ddpm_step(s, noise, xt, t, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and (a - x0).abs().max() < 1e-5
    # and does add noise elsewhere
    t = torch.full((2,), 500)
    a = D.ddpm_step(s, noise, xt, t, generator=torch.Generator().manual_seed(0))
    b = D.ddpm_step(s, noise, xt, t, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(a, b)


def oracle(s, x0, prediction):
    """A perfect denoiser: knows x0, so returns the exact eps (or v) for whatever x_t it gets."""

    def denoise(xt, t):
        eps = D.eps_from_x0(s, xt, t, x0)
        return D.training_target(s, x0, eps, t, prediction)

    return denoise


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sample_loop_with_oracle_returns_x0(method, prediction):
    s = D.make_schedule(200, "cosine")  # a shorter chain keeps full DDPM cheap
    x0 = torch.rand(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    out = D.sample_loop(oracle(s, x0, prediction), x0.shape, s, method=method, steps=25, prediction=prediction,
                        generator=torch.Generator().manual_seed(5))
    assert out.shape == x0.shape
    assert (out - x0).abs().max() < 1e-4


@pytest.mark.parametrize("method,eta", [("ddpm", 0.0), ("ddim", 1.0), ("ddim", 0.0)])
def test_sample_loop_is_deterministic_given_generator(method, eta):
    s = D.make_schedule(50)
    denoise = lambda x, t: 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1, 1)  # noqa: E731 - any non-oracle model
    run = lambda seed: D.sample_loop(denoise, (2, 2, 3, 4, 4), s, method=method, steps=10, eta=eta,  # noqa: E731
                                     generator=torch.Generator().manual_seed(seed))
    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError):
        D.sample_loop(denoise, (1, 1, 3, 4, 4), s, method="euler")


def test_cfg_combine():
    cond, uncond = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.allclose(D.cfg_combine(cond, uncond, 1.0), cond)
    assert torch.allclose(D.cfg_combine(cond, uncond, 0.0), uncond)
    assert torch.allclose(D.cfg_combine(cond, uncond, 3.0), uncond + 3 * (cond - uncond))


def test_diffusion_does_not_import_the_model():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(D))
    imported = {n.name for node in ast.walk(tree) if isinstance(node, ast.Import) for n in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    ours = {m for m in imported if m.split(".")[0] == "t2v"}
    assert ours <= {"t2v.progress"}  # the progress counter of a sampling loop, nothing of the model or data
    assert {m.split(".")[0] for m in imported - ours} <= {"torch", "math", "dataclasses", "typing", "__future__"}


@pytest.mark.parametrize("shift", [0.5, 2.0, 4.0])
def test_shifted_schedule_divides_every_snr_by_shift_squared(s, shift):
    shifted = D.make_schedule(T, "cosine", shift)
    # from t = 5: near t = 0, 1 - ᾱ in float32 has few digits; the last step is where the plain SNR is ~0
    t = torch.arange(5, T - 1, 37)
    ratio = D.snr(shifted, t).double() / D.snr(s, t).double()
    assert torch.allclose(ratio, torch.full_like(ratio, 1 / shift**2), rtol=1e-3)
    assert (shifted.betas > 0).all() and (shifted.betas < 1).all()
    assert torch.allclose(shifted.sqrt_alphas_cumprod**2 + shifted.sqrt_one_minus_alphas_cumprod**2, torch.ones(T))
    assert torch.equal(D.make_schedule(T, "cosine", 1.0).betas, s.betas)  # shift 1 is the plain schedule
    with pytest.raises(ValueError, match="shift"):
        D.make_schedule(T, "cosine", 0.0)


def test_min_snr_weights_follow_hang_et_al(s):
    t = torch.tensor([0, 200, 500, 800, 999])
    r = D.snr(s, t)
    acp = s.alphas_cumprod[t]
    assert torch.allclose(r, acp / (1 - acp))
    gamma = 5.0
    # eps: min(SNR, γ) / SNR -> 1 at high noise, γ/SNR at low noise
    assert torch.allclose(D.min_snr_weight(s, t, gamma, "eps"), torch.minimum(r, torch.tensor(gamma)) / r)
    # v: min(SNR, γ) / (SNR + 1)
    assert torch.allclose(D.min_snr_weight(s, t, gamma, "v"), torch.minimum(r, torch.tensor(gamma)) / (r + 1))
    assert D.min_snr_weight(s, t, gamma, "eps")[0] < 1e-3  # t = 0: the huge-SNR step is weighed down


def test_weighted_training_loss():
    out, target = torch.zeros(2, 3, 4), torch.stack([torch.ones(3, 4), 2 * torch.ones(3, 4)])  # per-sample MSE 1, 4
    assert D.training_loss(out, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1 + 2) / 2)
    assert D.training_loss(out, target, torch.ones(2)).item() == pytest.approx(D.training_loss(out, target).item())
