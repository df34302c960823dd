"""The diffusion maths against closed forms, and the samplers against an exact denoiser."""
import itertools
import math
import re

import numpy as np
import pytest
import torch

import ddpm
import unet


def test_linear_alpha_bar_matches_closed_form():
    d = ddpm.Diffusion("linear", 1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    for t in (0, 10, 499, 999):
        assert d.alphas_cumprod[t].item() == pytest.approx(np.prod(1 - betas[: t + 1]), rel=1e-12)
    # golden values, the paper's schedule: alpha-bar_999 is ~4.04e-5, so x_T is noise to 0.6% signal
    assert d.alphas_cumprod[999].item() == pytest.approx(4.0358e-05, rel=1e-4)
    assert d.betas.dtype == torch.float64


def test_cosine_alpha_bar_matches_closed_form():
    T, s = 1000, 0.008
    d = ddpm.Diffusion("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    for t in (0, 250, 500, 900):  # betas are below the 0.999 clip here, so alpha-bar_t = f(t+1) / f(0)
        assert d.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert d.betas.max().item() == pytest.approx(0.999)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_posterior_coefficients_are_consistent_with_the_marginals(schedule):
    d = ddpm.Diffusion(schedule, 1000)
    ab, ab_prev = d.alphas_cumprod[1:], d.alphas_cumprod_prev[1:]
    # E[x_{t-1} | x_0] through the posterior must equal sqrt(alpha-bar_{t-1}) x_0 (eqs. 4, 6, 7) ...
    torch.testing.assert_close(d.posterior_mean_coef1[1:] + d.posterior_mean_coef2[1:] * ab.sqrt(), ab_prev.sqrt())
    # ... and Var[x_{t-1} | x_0] = coef2^2 (1 - alpha-bar_t) + beta-tilde_t must equal 1 - alpha-bar_{t-1}
    torch.testing.assert_close(d.posterior_mean_coef2[1:] ** 2 * (1 - ab) + d.posterior_variance[1:], 1 - ab_prev)
    assert d.posterior_variance[0].item() == 0.0  # x_0 is determined at the last step


def test_x0_and_eps_recovered_from_x_t():
    d = ddpm.Diffusion()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 3, 8, 8, generator=g, dtype=torch.float64) * 2 - 1, torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    x_t = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, eps), x0)
    torch.testing.assert_close(d.predict_eps_from_x0(x_t, t, x0), eps)


def test_q_sample_statistics():
    d = ddpm.Diffusion()
    x0 = torch.full((200_000,), 0.5, dtype=torch.float64).view(-1, 1, 1, 1)
    for t in (100, 700):
        x_t = d.q_sample(x0, torch.full((len(x0),), t), torch.randn_like(x0, generator=None))
        assert x_t.mean().item() == pytest.approx(0.5 * d.sqrt_alphas_cumprod[t].item(), abs=0.01)
        assert x_t.std().item() == pytest.approx(d.sqrt_one_minus_alphas_cumprod[t].item(), rel=0.01)


def oracle(d, x_star, target="eps"):
    """The exact denoiser when the data is the single image x_star: x_0 is known, so eps follows from eq. 4."""
    def model(x_t, t, y=None):
        ab = d.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        eps = (x_t - ab.sqrt() * x_star) / (1 - ab).sqrt()
        return {"eps": eps, "x0": x_star.expand_as(x_t), "v": ab.sqrt() * eps - (1 - ab).sqrt() * x_star}[target]
    return model


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_training_loss_is_zero_for_the_exact_denoiser(target):
    d = ddpm.Diffusion(target=target)
    x_star = torch.rand(1, 1, 8, 8) * 1.6 - 0.8
    x0 = x_star.expand(6, 1, 8, 8)
    t = torch.tensor([1, 10, 200, 500, 900, 998])
    assert d.training_loss(oracle(d, x_star, target), x0, t=t).item() < 1e-6
    assert d.training_loss(lambda x, t, y=None: torch.zeros_like(x), x0, t=t).item() > 0.05


@pytest.mark.parametrize("sampler,steps,dpm", [("ddpm", 1000, {}), ("ddim", 20, {}), ("dpm++", 10, {}), ("dpm++", 2, {}),
                                               ("dpm++", 10, dict(order=3, spacing="logsnr")), ("dpm++", 4, dict(order=3))])
@pytest.mark.parametrize("target", ["eps", "v"])
def test_samplers_land_on_the_data_with_the_exact_denoiser(sampler, steps, dpm, target):
    d = ddpm.Diffusion(target=target)
    x_star = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    x = d.sample(oracle(d, x_star, target), (3, 3, 4, 4), sampler=sampler, steps=steps,
                 generator=torch.Generator().manual_seed(0), **dpm)
    assert (x - x_star).abs().max().item() < 1e-4


def test_guidance_combines_in_one_forward_pass():
    calls = []

    def model(x, t, y):
        calls.append(len(x))
        return torch.where((y >= 0).view(-1, 1, 1, 1), 0.4 * torch.ones_like(x), -0.4 * torch.ones_like(x))

    d = ddpm.Diffusion(target="x0")
    x = torch.zeros(2, 1, 4, 4)
    _, x0 = d.predict(model, x, 500, y=torch.tensor([0, 1]), guidance=0.25)
    assert calls == [4]  # one batched call: conditional and null halves together
    torch.testing.assert_close(x0, torch.full_like(x, (1 + 0.25) * 0.4 - 0.25 * -0.4))


def test_guidance_takes_one_label_for_the_batch_as_the_network_does():
    d, x = ddpm.Diffusion(target="x0"), torch.zeros(3, 1, 4, 4)
    model = lambda x, t, y: (y >= 0).float().view(-1, 1, 1, 1) * torch.ones_like(x)  # 1 with a label, 0 without
    for y in (torch.tensor(1), torch.tensor([1]), torch.tensor([1, 1, 1]), 1):
        torch.testing.assert_close(d.predict(model, x, 500, y, guidance=2.0)[1], torch.full_like(x, 1.0))


def test_library_defaults_fit_a_small_T_and_guidance_needs_labels():
    d, x = ddpm.Diffusion("cosine", T=12, target="v"), torch.zeros(2, 1, 4, 4)
    for sampler, steps in (("ddim", 12), ("dpm++", 12)):  # default 50 and 20 steps, but no more than T
        assert len(list(d.loop(lambda x, t, y: torch.zeros_like(x), x, sampler=sampler))) == steps
    with pytest.raises(ValueError, match="guidance needs labels y"):
        d.predict(lambda x, t, y: x, x, 5, guidance=2.0)
    with pytest.raises(ValueError, match="network without classes"):  # guidance would silently do nothing
        unet.UNet(ch=32, ch_mult=(1,), num_res_blocks=1, image_size=(4, 4), in_ch=1)(x, torch.zeros(2), torch.zeros(2))


def test_settings_that_would_be_ignored_or_misread_are_refused():
    d, zero = ddpm.Diffusion(T=50), lambda x, t, y=None: torch.zeros_like(x)
    for kwargs, words in ((dict(sampler="ddpm", steps=10), "ddpm takes all T"),
                          (dict(sampler="dpm++", eta=1.0), "ddim's"), (dict(sampler="ddim", eta=2.0), "eta must be in"),
                          (dict(sampler="ddpm", variance="fixedlarge"), "'beta' or 'beta_tilde'"),
                          (dict(sampler="ddim", variance="beta_tilde"), "variance ddpm's"),
                          (dict(sampler="ddim", order=3), "order and spacing dpm\\+\\+'s"),
                          (dict(sampler="dpm++", order=4), "order must be 1, 2 or 3"),
                          (dict(sampler="dpm++", spacing="karras"), "spacing 'time' or 'logsnr'"),
                          (dict(sampler="DDPM", variance="beta_tilde"), "unknown sampler 'DDPM'")):
        with pytest.raises(ValueError, match=words):
            d.sample(zero, (1, 1, 4, 4), **kwargs)


def test_bf16_inputs_get_float32_coefficients():
    """At t = 999, x_0 = 157 x_t - 157 eps: coefficients rounded to bf16 left an error of about 1 in x_0."""
    d, t = ddpm.Diffusion("linear", 1000), torch.full((4,), 999)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.rand(4, 3, 8, 8, generator=g) * 1.8 - 0.9, torch.randn(4, 3, 8, 8, generator=g)
    x_t = d.q_sample(x0, t, eps).bfloat16()
    exact = (x_t.double() - d.sqrt_one_minus_alphas_cumprod[999] * eps.double()) / d.sqrt_alphas_cumprod[999]
    assert (d.predict_x0_from_eps(x_t, t, eps).double() - exact).abs().max() < 1e-3


def test_immiscible_assignment_is_optimal():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 1, 3, 3, generator=g), torch.randn(6, 1, 3, 3, generator=g)
    total = lambda n: (x0 - n).flatten(1).norm(dim=1).sum().item()
    best = min(total(noise[list(p)]) for p in itertools.permutations(range(6)))
    assigned = ddpm.immiscible_noise(x0, noise)
    assert total(assigned) == pytest.approx(best, rel=1e-6)
    assert sorted(map(tuple, assigned.flatten(1).tolist())) == sorted(map(tuple, noise.flatten(1).tolist()))


def test_immiscible_noise_is_both_the_input_noise_and_the_target():
    """With the exact denoiser of each image the loss is zero only if x_t was built from the same
    reassigned noise that is regressed on; permuting only the input (a known bug) gives a large loss."""
    d = ddpm.Diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(8, 1, 4, 4, generator=g) * 2 - 1
    t = torch.full((8,), 300)

    def exact(x_t, t, y=None):  # knows each row's x0, so returns exactly the noise inside x_t
        ab = d.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()

    noise = torch.randn(8, 1, 4, 4, generator=g)
    assert not torch.equal(ddpm.immiscible_noise(x0, noise), noise)  # the assignment does reorder here
    assert d.training_loss(exact, x0, t=t, noise=noise, immiscible=True).item() < 1e-8


def test_input_perturbation_noises_the_input_and_keeps_the_target():
    """DDPM-IP: the exact denoiser of the input's noise scores gamma^2 (the extra noise is its error), the exact
    denoiser of the target's noise scores what it sees of the input's noise; gamma 0 is the paper's loss, bit for bit."""
    d = ddpm.Diffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.rand(64, 1, 8, 8, generator=g) * 2 - 1, torch.randn(64, 1, 8, 8, generator=g), torch.full((64,), 300)
    seen = []

    def exact(x_t, t, y=None):  # returns exactly the noise inside x_t
        ab = d.alphas_cumprod[t].view(-1, 1, 1, 1).float()
        seen.append((x_t - ab.sqrt() * x0) / (1 - ab).sqrt())
        return seen[-1]
    assert d.training_loss(exact, x0, t=t, noise=noise, perturb=0.0).item() < 1e-8
    torch.manual_seed(0)
    loss = d.training_loss(exact, x0, t=t, noise=noise, perturb=0.1).item()
    assert loss == pytest.approx(0.01, rel=0.1)  # E[(gamma xi)^2] over 4096 values
    assert (seen[-1] - noise).std().item() == pytest.approx(0.1, rel=0.1)


def test_lognormal_t_is_the_step_nearest_in_log_sigma_to_edms_draw():
    """--t-density P_MEAN,P_STD: each t is the step whose sigma_t = sqrt(1/alpha-bar_t - 1) is nearest in log to a
    draw of N(P_MEAN, P_STD^2), clipped to [0, T); uniform is Algorithm 1's draw, bit for bit."""
    d = ddpm.Diffusion("cosine", 1000, "v")
    torch.manual_seed(0)
    t = d.sample_t(20000, lognormal=(-1.2, 1.2))
    torch.manual_seed(0)
    drawn = torch.randn(20000).double() * 1.2 - 1.2
    nearest = (d.sqrt_recipm1_alphas_cumprod.log()[None] - drawn[:, None]).abs().argmin(1)
    assert torch.equal(t, nearest)
    assert 0.02 < (d.sqrt_recipm1_alphas_cumprod[t] > 3).double().mean() < 0.04  # sigma > 3: 20.7% of uniform t
    assert d.sample_t(3, lognormal=(50.0, 1e-3)).tolist() == [999] * 3  # clipped at the ends
    assert d.sample_t(3, lognormal=(-50.0, 1.0)).tolist() == [0] * 3
    torch.manual_seed(1)
    uniform = d.sample_t(100)
    torch.manual_seed(1)
    assert torch.equal(uniform, torch.randint(0, 1000, (100,)))


def test_autoguidance_extrapolates_from_the_weak_network():
    """Karras et al. 2024, eq. 2: (1 + w) D - w D_weak; w = 0, or a weak network equal to the model, is the model."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([1, 5, 9, 20])
    model, weak = (lambda x_t, t, y=None: 2 * x_t), (lambda x_t, t, y=None: x_t + t.view(-1, 1, 1, 1))
    torch.testing.assert_close(ddpm.autoguided(model, weak, 0.0)(x, t), 2 * x)
    torch.testing.assert_close(ddpm.autoguided(model, model, 3.0)(x, t), 2 * x)
    torch.testing.assert_close(ddpm.autoguided(model, weak, 0.5)(x, t), 3 * x - 0.5 * (x + t.view(-1, 1, 1, 1)))


def test_spaced_timesteps():
    assert ddpm.spaced_timesteps(1000, 4) == [999, 749, 499, 249]
    assert ddpm.spaced_timesteps(1000, 1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError):
        ddpm.spaced_timesteps(1000, 0)


@pytest.mark.parametrize("order, degree", [(1, 0), (3, 2)])
def test_a_dpm_solver_step_is_exact_where_x0_is_a_polynomial_of_its_order_minus_one_in_lambda(order, degree):
    """x_t = sigma_t / sigma_s x_s + sigma_t int_{lambda_s}^{lambda_t} e^lambda x_0(lambda) dlambda for a network whose
    x_0 is a function of lambda alone (Lu et al. 2022, eq. 3.4 for the data prediction): DDIM is exact for a constant,
    3M for a quadratic, integrated here by scipy's quadrature, at uneven step sizes."""
    from scipy.integrate import quad
    d = ddpm.Diffusion("cosine", 1000)
    lam, sigma = d.lambdas.tolist(), d.sqrt_one_minus_alphas_cumprod.tolist()
    x0 = lambda l: [0.4, 0.4 - 0.3 * l, 0.4 - 0.3 * l + 0.05 * l * l][degree]
    s2, s1, s, t = 900, 700, 620, 400
    preds = [(k, torch.tensor([x0(lam[k])], dtype=torch.float64)) for k in (s, s1, s2)]
    x_s = torch.tensor([0.7], dtype=torch.float64)
    exact = sigma[t] / sigma[s] * 0.7 + sigma[t] * quad(lambda l: math.exp(l) * x0(l), lam[s], lam[t])[0]
    assert d.dpm_solver_step(x_s, t, preds, order).item() == pytest.approx(exact, rel=1e-9)
    if degree:  # and the lower orders are not: the test can tell
        assert d.dpm_solver_step(x_s, t, preds, 2).item() != pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("schedule, start", [("cosine", 994), ("linear", 999)])
def test_logsnr_steps_are_evenly_spaced_in_lambda_from_the_truncated_end(schedule, start):
    d = ddpm.Diffusion(schedule, 1000)
    ts = d.logsnr_timesteps(20)
    assert ts[0] == 999 and len(ts) == 20 and ts == sorted(set(ts), reverse=True)
    lam = d.lambdas
    h = (lam[0] - lam[start]).item() / 20  # the grid's step; each t is the nearest step to its grid point
    for i, t in enumerate(ts[1:], 1):
        assert abs(lam[t].item() - (lam[start].item() + i * h)) <= (lam[t - 1] - lam[t + 1]).item() / 2
    assert len(d.logsnr_timesteps(1000)) < 1000  # steps that would share a timestep are made once


def test_slerp_ends_and_keeps_the_norm():
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    torch.testing.assert_close(ddpm.slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(ddpm.slerp(z0, z1, 1.0), z1)
    mid = ddpm.slerp(z0, z1, 0.5)  # norms of 192-d Gaussians agree to a few %, and slerp stays between them
    lerp = 0.5 * (z0 + z1)
    assert (mid.flatten(1).norm(dim=1) > 0.95 * z0.flatten(1).norm(dim=1).minimum(z1.flatten(1).norm(dim=1))).all()
    assert (lerp.flatten(1).norm(dim=1) < 0.8 * z0.flatten(1).norm(dim=1)).all()  # what slerp is for
    torch.testing.assert_close(ddpm.slerp(z0, z0, 0.3), z0)  # no angle: the limit, not 0 / 0


def test_inpainting_keeps_the_known_pixels_and_fills_the_hole_from_the_model():
    d = ddpm.Diffusion()
    g = torch.Generator().manual_seed(0)
    x_star = torch.rand(1, 1, 6, 6, generator=g) * 1.6 - 0.8
    image = torch.rand(2, 1, 6, 6, generator=g) * 2 - 1  # differs from x_star everywhere
    known = torch.zeros(1, 1, 6, 6)
    known[..., :3] = 1  # left half known
    for mask in (known, known.bool()):  # a {0, 1} mask or a bool one
        for _, x, _ in d.inpaint_loop(oracle(d, x_star), image, mask, resample=2, generator=g.manual_seed(1), jump=10):
            pass
        torch.testing.assert_close(x[..., :3], image[..., :3])
        assert (x[..., 3:] - x_star[..., 3:]).abs().max().item() < 1e-3


def test_repaint_schedule_against_the_algorithm_by_hand():
    # Lugmayr et al. sec. 4.2 / their jump schedule: down one step at a time; at each multiple of j whose jump
    # stays below T, back up j (one move) and down again, r - 1 times. T=8, j=2, r=2: jumps from 4, 2 and 0
    # (not from 6: 6 + 2 is past T - 1 = 7)
    assert ddpm.repaint_schedule(8, 2, 2) == [7, 6, 5, 4, 6, 5, 4, 3, 2, 4, 3, 2, 1, 0, 2, 1, 0, -1]
    # T=7, j=3, r=3: jumps from 3 and 0, each stretch walked three times
    assert ddpm.repaint_schedule(7, 3, 3) == [6, 5, 4, 3, 6, 5, 4, 3, 6, 5, 4, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, -1]
    # j=1 is Algorithm 1 as printed (each step redone r times, re-noised by one step), but its last step once
    assert ddpm.repaint_schedule(4, 1, 3) == [3, 2, 3, 2, 3, 2, 1, 2, 1, 2, 1, 0, 1, 0, 1, 0, -1]
    assert ddpm.repaint_schedule(6, 2, 1) == [5, 4, 3, 2, 1, 0, -1]  # r=1: one pass
    assert ddpm.repaint_schedule(5, 10, 1) == [4, 3, 2, 1, 0, -1]  # r=1 needs no jump
    for jump, resample in ((0, 2), (5, 10), (10, 10)):  # no jump at all, or none that stays below T: never a
        with pytest.raises(ValueError, match="jump"):  # silent single pass where r passes were asked for
            ddpm.repaint_schedule(5, jump, resample)


def test_repaint_schedule_published_setting_and_no_repeats_at_t0():
    ts = ddpm.repaint_schedule(1000, 10, 10)
    assert all(b == a - 1 or b == a + 10 for a, b in zip(ts, ts[1:]))
    steps = [a for a, b in zip(ts, ts[1:]) if b < a]  # the reverse steps, by the timestep the network sees
    counts = [steps.count(t) for t in range(1000)]
    assert counts[0] == 1 and ts[-2:] == [0, -1] and ts.count(-1) == 1  # the last step, t=0, once
    assert counts[1:991] == [10] * 990  # every step from 990 down to 1 is taken r = 10 times
    assert counts[991:] == [1] * 9  # the top stretch cannot jump (a jump from 990 would pass 999)


def test_q_sample_from_is_eq2_step_by_step():
    d = ddpm.Diffusion()
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for s, t in [(0, 10), (240, 250), (3, 4), (0, 999)]:
        mean, var = 1.0, 0.0  # x_u = sqrt(alpha_u) x_{u-1} + sqrt(beta_u) z, eq. 2, for u = s+1 ... t
        for u in range(s + 1, t + 1):
            mean, var = mean * d.alphas[u].sqrt().item(), d.alphas[u].item() * var + d.betas[u].item()
        torch.testing.assert_close(d.q_sample_from(x, s, t, noise), mean * x + math.sqrt(var) * noise)


def test_inpainting_keeps_the_known_pixels_at_each_steps_noise_level_across_jumps():
    d = ddpm.Diffusion("linear", T=40)
    g = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 6, 6, generator=g) * 2 - 1
    known = torch.zeros(1, 1, 6, 6)
    known[..., :3] = 1
    calls, drawn = [], []  # the network's timesteps; each q(x_{t-1} | x_0 = image) drawn for the known pixels
    q_sample = d.q_sample

    def spy(x0, t, noise):
        drawn.append((t[0].item(), q_sample(x0, t, noise)))
        return drawn[-1][1]

    def model(x, t, y=None):
        calls.append(t[0].item())
        return 0.3 * x

    d.q_sample = spy
    for t, x, _ in d.inpaint_loop(model, image, known, resample=3, generator=g, jump=5):
        level, x_known = drawn[-1] if t else (-1, image)
        assert level == t - 1 and torch.equal(x[..., :3], x_known[..., :3])
    assert torch.equal(x[..., :3], image[..., :3])  # exactly the image at the end
    assert calls.count(0) == 1 and calls.count(1) == 3 and calls.count(39) == 1 and len(calls) == 3 * 35 + 5


def test_mix_denoises_the_noised_pixel_blend():
    d = ddpm.Diffusion()
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 1, 1, 4, 4, generator=g) * 2 - 1
    model = lambda x, t, y=None: 0.3 * x  # any fixed network
    mixed = d.mix(model, a, b, 300, 0.25, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    x = d.q_sample(0.75 * a + 0.25 * b, torch.tensor([300]), torch.randn(a.shape, generator=g))
    for _, x, _ in d.ddpm_loop(model, x, generator=g, t_start=300):
        pass
    torch.testing.assert_close(mixed, x.clamp(-1, 1))
    x_star = torch.full_like(a, 0.5)
    torch.testing.assert_close(d.mix(oracle(d, x_star), a, b, 999, 0.5), x_star, atol=1e-4, rtol=0)


@pytest.mark.parametrize("schedule, T, words", [("linear", 10, "betas outside (0, 1)"), ("cosine", 0, "at least 2"),
                                                ("cosine", 2.5, "whole number")])
def test_a_diffusion_without_a_valid_schedule_is_refused(schedule, T, words):
    with pytest.raises(ValueError, match=re.escape(words)):  # not NaN samples or a ZeroDivisionError later
        ddpm.Diffusion(schedule, T)


def test_data_of_any_shape_and_a_prediction_of_the_wrong_shape():
    d = ddpm.Diffusion("cosine", np.int64(50), "v")  # a numpy integer T is a T
    assert type(d.config()["T"]) is int
    points = torch.randn(8, 2)  # toy 2-d data: [N, D], not [N, C, H, W]
    assert d.q_sample(points, torch.arange(8), torch.randn(8, 2)).shape == (8, 2)
    assert d.training_loss(lambda x, t, y=None: torch.zeros_like(x), points).ndim == 0
    assert d.sample(lambda x, t, y=None: torch.zeros_like(x), (4, 2), steps=5).shape == (4, 2)
    with pytest.raises(ValueError, match=re.escape("prediction [4, 1, 8, 8] is not shaped as its input [4, 3, 8, 8]")):
        d.training_loss(lambda x, t, y=None: x[:, :1], torch.randn(4, 3, 8, 8))  # broadcast: garbage, not an error


def test_one_generator_per_sample_or_one_for_all():
    gs = [torch.Generator().manual_seed(i) for i in range(3)]
    x = ddpm.randn((3, 2), gs)
    torch.testing.assert_close(x[1], torch.randn(2, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="3 generators for 2 samples"):  # not 3 samples where 2 were asked
        ddpm.randn((2, 2), [torch.Generator().manual_seed(i) for i in range(3)])


# --- the variational bound on -log p(x_0) (eq. 5), against closed forms -------------------------------------------

def test_kl_of_gaussians_is_zero_for_identical_ones_and_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m1, m2, v1, v2 = torch.randn(4, 100, generator=g, dtype=torch.float64).unbind()
    v1, v2 = v1.exp(), v2.exp()
    assert ddpm.normal_kl(m1, v1, m1, v1).abs().max().item() < 1e-15
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(m1, v1.sqrt()),
                                                 torch.distributions.Normal(m2, v2.sqrt()))
    torch.testing.assert_close(ddpm.normal_kl(m1, v1, m2, v2), expected)


@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.3, 1e-4), (-0.99, 3.0), (1.0, 1e-3), (5.0, 0.5), (0.2, 100.0)])
def test_the_decoders_256_bins_of_a_pixel_hold_all_the_probability(mean, std):
    from scipy.stats import norm
    levels = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    log_p = ddpm.discretized_gaussian_log_likelihood(levels, torch.tensor(mean, dtype=torch.float64), std)
    assert log_p.exp().sum().item() == pytest.approx(1, abs=1e-12)
    k = 100  # an inner bin, and both end bins, as scipy integrates them (eq. 13)
    inner = norm.cdf((levels[k] + 1 / 255 - mean) / std) - norm.cdf((levels[k] - 1 / 255 - mean) / std)
    ends = norm.logcdf((-1 + 1 / 255 - mean) / std), norm.logsf((1 - 1 / 255 - mean) / std)
    assert log_p[k].exp().item() == pytest.approx(inner, rel=1e-9, abs=1e-300)
    assert log_p[[0, -1]].tolist() == pytest.approx(ends, rel=1e-9)  # finite far in a tail: no log(0)


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_the_bound_of_the_exact_denoiser_is_its_prior_and_decoder_terms(target):
    # The oracle predicts the true x_0, so p's mean is q's posterior mean at every t > 0: with sigma_t^2 = beta-tilde_t
    # each KL is 0; with beta_t it is the variances' part alone. What remains has a closed form per pixel.
    from scipy.stats import norm
    d = ddpm.Diffusion("linear", 1000, target)
    g = torch.Generator().manual_seed(0)
    x_star = torch.randint(0, 256, (1, 3, 4, 4), generator=g) / 127.5 - 1  # on the 256 levels, ends included
    x_star[0, 0, 0, :2] = torch.tensor([-1.0, 1.0])
    x = x_star.double().flatten()
    ab, beta, beta_tilde = d.alphas_cumprod[-1].item(), d.betas[1:], d.posterior_variance[1:]
    prior = (0.5 * (-math.log(1 - ab) + (1 - ab) + ab * x ** 2 - 1)).mean() / math.log(2)
    z = 1 / 255 / d.posterior_variance[1].sqrt().item()  # the decoder's half bin in its std (beta-tilde_2)
    end = (x.abs() == 1).double()  # an end bin reaches to infinity on one side: Phi(z), an inner one 2 Phi(z) - 1
    decoder = -(end * norm.logcdf(z) + (1 - end) * math.log(2 * norm.cdf(z) - 1)).mean() / math.log(2)
    variances_kl = 0.5 * (torch.log(beta / beta_tilde) + beta_tilde / beta - 1) / math.log(2)  # [T - 1], per pixel
    for variance, kl in (("beta_tilde", torch.zeros(999, dtype=torch.float64)), ("beta", variances_kl)):
        terms = list(d.nll_terms(oracle(d, x_star, target), x_star.expand(2, 3, 4, 4), variance=variance, generator=g))
        assert [t for t, _ in terms] == list(range(1000, -1, -1))  # the prior L_T, then every step down to 0
        bits = torch.stack([b for _, b in terms[::-1]], 1)  # [2 images, T + 1], column t the term of step t
        torch.testing.assert_close(bits[:, 1:1000], kl.expand(2, 999), atol=1e-7, rtol=0)
        torch.testing.assert_close(bits[:, 1000], prior.expand(2), atol=1e-12, rtol=1e-9)
        # (the oracle works in float32: x_t's rounding moves the decoder's mean by ~6e-8, a few 1e-6 bits at the ends)
        torch.testing.assert_close(bits[:, 0], decoder.expand(2), atol=1e-5, rtol=0)
    assert variances_kl.sum().item() == pytest.approx(0.486, abs=1e-3)  # what beta_t costs the paper's schedule
    unclipped = list(d.nll_terms(lambda x, t, y=None: torch.zeros_like(x), x_star, variance="beta_tilde"))
    assert sum(b for _, b in unclipped).item() > bits[0].sum().item() + 1  # a model that knows nothing pays more


def test_the_bound_refuses_an_unknown_variance():
    d = ddpm.Diffusion("cosine", 10)
    with pytest.raises(ValueError, match="variance must be 'beta' or 'beta_tilde'"):
        list(d.nll_terms(lambda x, t, y=None: x, torch.zeros(1, 1, 2, 2), variance="learned"))
