"""The diffusion process of Ho, Jain & Abbeel (2020), "Denoising Diffusion Probabilistic Models".

    diffusion = Diffusion("linear", T=1000, target="eps")
    loss = diffusion.training_loss(model, x0)                  # Algorithm 1
    x = diffusion.sample(model, (16, 3, 32, 32), sampler="ddpm")  # Algorithm 2
    nll = sum(bits for _, bits in diffusion.nll_terms(model, x0))  # eq. 5's bound on -log p(x_0), bits/dim [N]

Also DDIM and DPM-Solver++(2M) with classifier-free guidance or autoguidance, RePaint inpainting, mixing and slerp.
`model` is any callable model(x_t, t, y=None) -> prediction, y = -1 the null label. Images are [N, C, H, W] in
[-1, 1] (any [N, ...] data works); timesteps are integers in [0, T). The diffusion computes in float32 at least: run a
bf16 or fp16 network under torch.autocast. Depends on torch and scipy only.
"""
import math
import numbers

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


# The default sampler and its steps (sample.py's, and training's sample grids and FIDs): the best quality for the time
# we measured (docs/benchmarks.md, "Samplers").
DEFAULT_SAMPLER, DEFAULT_STEPS = "dpm++", 20


def beta_schedule(name, T):
    """Betas [T] in float64: 'linear' (Ho et al.: 1e-4 to 0.02 at T = 1000, scaled by 1000/T otherwise, as
    Nichol & Dhariwal do) or 'cosine' (Nichol & Dhariwal 2021, eq. 17, s = 0.008, clipped at 0.999)."""
    if name == "linear":
        return torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    if name == "cosine":
        alpha_bar = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)  # clipped to avoid a singular end
    raise ValueError(f"unknown beta schedule {name!r}; choose 'linear' or 'cosine'")


def immiscible_noise(x0, noise):
    """Li et al. 2024 (arXiv 2406.12303): reorder the batch's noise so that the total L2 distance between
    each image and its noise is minimal (a linear assignment on the [N, N] distance matrix)."""
    _, cols = linear_sum_assignment(torch.cdist(x0.flatten(1).float(), noise.flatten(1).float()).cpu().numpy())
    return noise[torch.as_tensor(cols, device=noise.device)]


def _at(a, t, x):
    """a[t] (a per-timestep tensor) on x's device, shaped to broadcast over x [N, ...], as x's dtype but at least
    float32: in bf16, 1/sqrt(alpha-bar) x_t - sqrt(1/alpha-bar - 1) eps at t = 999 (both ~157) would be off by ~1."""
    return a.to(x.device)[t].to(torch.promote_types(x.dtype, torch.float32)).view(-1, *[1] * (x.dim() - 1))


def randn(shape, generator=None, device="cpu"):
    """N(0, I) noise of `shape`. `generator` is one torch.Generator, or a list of one per sample (along dim 0):
    each sample then draws from its own stream, so its noise does not depend on the batch it is sampled in."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} samples: give one per sample, or one")
        return torch.stack([torch.randn(shape[1:], generator=g, device=device) for g in generator])
    return torch.randn(shape, generator=generator, device=device)


def autoguided(model, weak, w):
    """Autoguidance (Karras et al. 2024, arXiv 2406.02507, eq. 2 with their w = 1 + w): the model steered away from
    a weaker one of the same task (an early snapshot of its run): out = (1 + w) model - w weak, w = 0 the model
    alone. Linear in the output, as guidance is, so it is the same for every target. Two network calls a step."""
    def guided(x_t, t, y=None):
        return (1 + w) * model(x_t, t, y).float() - w * weak(x_t, t, y).float()
    return guided


def spaced_timesteps(T, steps):
    """`steps` timesteps from T-1 down, evenly spaced ("trailing", Lin et al. 2024), so the first step
    starts from pure noise: T=1000, steps=4 -> [999, 749, 499, 249]."""
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}], got {steps}")
    return [round(T - i * T / steps) - 1 for i in range(steps)]


def repaint_schedule(T, jump=10, resample=10):
    """The timesteps RePaint visits (Lugmayr et al. 2022, sec. 4.2, and their code's jump schedule), from T-1
    (pure noise) to -1 (the image): down one step at a time; at each multiple of `jump` from which a jump stays
    below T, back up `jump` steps and down again, until that stretch is walked `resample` times. A jump is one
    move, q(x_{t+jump} | x_t) (their code walks it step by step: the same distribution). The last step is once.
    T=8, jump=2, resample=2 -> [7, 6, 5, 4, 6, 5, 4, 3, 2, 4, 3, 2, 1, 0, 2, 1, 0, -1]. Published: jump 10,
    resample 10 on 250 steps (sec. 5.1); jump 1 is Algorithm 1 as printed."""
    if jump < 1 or resample < 1 or (resample > 1 and jump >= T):  # a jump from T-1 or more would never be made
        raise ValueError(f"jump and resample must be at least 1, and jump below T = {T} to resample; got {jump} and "
                         f"{resample}")
    ts = []
    for t in range(T - 1, -1, -1):
        ts.append(t)
        if t % jump == 0 and t + jump < T:  # back up to t + jump and down to t again, resample - 1 times
            ts += list(range(t + jump, t - 1, -1)) * (resample - 1)
    return ts + [-1]


def slerp(z0, z1, alpha):
    """Spherical interpolation between two noise tensors per sample (Shoemake 1985), as DDIM (Song et al.
    2021, sec. 5.3) interpolates x_T: a straight line would shrink the norm a Gaussian sample has."""
    cos = F.cosine_similarity(z0.flatten(1), z1.flatten(1)).clamp(-1, 1)
    theta = torch.acos(cos).clamp(min=1e-4).view(-1, *[1] * (z0.dim() - 1))  # parallel: the limit, a straight line
    return (torch.sin((1 - alpha) * theta) * z0 + torch.sin(alpha * theta) * z1) / torch.sin(theta)


def normal_kl(mean1, var1, mean2, var2):
    """KL(N(mean1, var1) || N(mean2, var2)) of each element, in nats: the closed form for two Gaussians,
    (log(var2 / var1) + (var1 + (mean1 - mean2)^2) / var2 - 1) / 2. Tensors or numbers that broadcast, one variance
    at least a tensor."""
    return 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)


def discretized_gaussian_log_likelihood(x, mean, std):
    """log P(x) of each element of images x on the 256 levels of [-1, 1] under N(mean, std^2) integrated over the
    level's bin (Ho et al. sec. 3.3, eq. 13): [x - 1/255, x + 1/255], from -inf at x = -1 and to +inf at x = 1, so
    the 256 probabilities sum to 1. The bin's mass is read in the tail it lies in, through log_ndtr: a difference of
    two CDFs near 1 would round to 0 (and log to -inf) for a bin a few std above the mean."""
    low = torch.where(x < -0.999, -math.inf, x - 1 / 255)
    high = torch.where(x > 0.999, math.inf, x + 1 / 255)
    a, b = (low - mean) / std, (high - mean) / std
    above = a + b > 0  # the bin's centre above the mean: P(a < Z < b) = P(-b < Z < -a), in the lower tail
    a, b = torch.where(above, -b, a), torch.where(above, -a, b)
    log_b = torch.special.log_ndtr(b)
    return log_b + torch.log(-torch.expm1(torch.special.log_ndtr(a) - log_b))  # log(Phi(b) - Phi(a))


class Diffusion:
    """The fixed forward process and what follows from it: per-timestep tensors computed once in float64, named
    after the paper's symbols. `target`: what the network predicts (eps, x0 or v); `loss`: mse or l1."""

    def __init__(self, schedule="linear", T=1000, target="eps", loss="mse"):
        if target not in ("eps", "x0", "v") or loss not in ("mse", "l1"):
            raise ValueError(f"target must be eps, x0 or v and loss mse or l1, got {target!r}, {loss!r}")
        if not (isinstance(T, numbers.Integral) and T >= 2):  # (numpy's integers too)
            raise ValueError(f"T must be a whole number of steps, at least 2, got {T!r}")
        self.schedule, self.T, self.target, self.loss = schedule, int(T), target, loss
        self.betas = beta_schedule(schedule, T)
        if not ((self.betas > 0) & (self.betas < 1)).all():  # the linear schedule's, scaled by 1000/T, for T <= 20
            raise ValueError(f"the {schedule} schedule with T = {T} has betas outside (0, 1); use a larger T")
        self.alphas = 1 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)  # alpha-bar_t
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()
        self.lambdas = (self.sqrt_alphas_cumprod / self.sqrt_one_minus_alphas_cumprod).log()  # half the log-SNR
        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta-tilde_t I), eqs. 6-7
        self.posterior_variance = self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1 - self.alphas_cumprod)

    def to(self, device):
        """Move the per-timestep tensors (float64) to a device."""
        vars(self).update({name: v.to(device) for name, v in vars(self).items() if torch.is_tensor(v)})
        return self

    def config(self):
        return dict(schedule=self.schedule, T=self.T, target=self.target, loss=self.loss)

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I), eq. 4."""
        return _at(self.sqrt_alphas_cumprod, t, x0) * x0 + _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_sample_from(self, x_s, s, t, noise):
        """x_t ~ q(x_t | x_s) for s < t: eq. 2 applied t - s times collapses, as eq. 4 does, into
        N(sqrt(alpha-bar_t / alpha-bar_s) x_s, (1 - alpha-bar_t / alpha-bar_s) I)."""
        a = (self.alphas_cumprod[t] / self.alphas_cumprod[s]).item()
        return math.sqrt(a) * x_s + math.sqrt(1 - a) * noise

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x_0), eqs. 6-7."""
        mean = _at(self.posterior_mean_coef1, t, x_t) * x0 + _at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, _at(self.posterior_variance, t, x_t)

    def predict_x0_from_eps(self, x_t, t, eps):
        """Invert eq. 4: x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t)."""
        return _at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - _at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def predict_eps_from_x0(self, x_t, t, x0):
        return (_at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _at(self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def v_target(self, x0, t, noise):
        """Salimans & Ho 2022: v = sqrt(alpha-bar_t) eps - sqrt(1 - alpha-bar_t) x_0."""
        return _at(self.sqrt_alphas_cumprod, t, x0) * noise - _at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def x0_from_prediction(self, x_t, t, out):
        """The x_0 the network's output `out` at x_t means for its target, unclipped: eps, eq. 4 inverted; v,
        x_0 = sqrt(alpha-bar_t) x_t - sqrt(1 - alpha-bar_t) v; x0, itself."""
        if self.target == "eps":
            return self.predict_x0_from_eps(x_t, t, out)
        if self.target == "v":
            return _at(self.sqrt_alphas_cumprod, t, x_t) * x_t - _at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * out
        return out

    def sample_t(self, n, device="cpu", lognormal=None):
        """n timesteps for training: t ~ U[0, T) (Algorithm 1), or with lognormal = (P_mean, P_std) EDM's noise levels
        (Karras et al. 2022, Table 1: ln sigma ~ N(-1.2, 1.2^2)), each snapped to the step whose sigma_t is nearest in
        log: x_t / sqrt(alpha-bar_t) = x_0 + sigma_t eps, so sigma_t = sqrt(1 / alpha-bar_t - 1)."""
        if lognormal is None:
            return torch.randint(0, self.T, (n,), device=device)
        log_sigma = self.sqrt_recipm1_alphas_cumprod.log()  # increasing in t
        edges = ((log_sigma[1:] + log_sigma[:-1]) / 2).float().to(device)  # between neighbouring steps
        return torch.searchsorted(edges, torch.randn(n, device=device) * lognormal[1] + lognormal[0])

    def training_loss(self, model, x0, y=None, t=None, noise=None, immiscible=False, perturb=0.0):
        """Algorithm 1 (eq. 14 for target 'eps'), averaged over batch and pixels; t ~ U[0, T) and noise ~ N(0, I)
        unless given. `immiscible` reassigns the noise to the images: as the input's noise and as the target.
        `perturb` gamma > 0 is Ning et al. 2023's input perturbation (DDPM-IP, eq. 9): the network sees x_t made with
        noise + gamma xi, xi ~ N(0, I), and is still asked for the target of `noise`, as sampling's errors will ask."""
        t = self.sample_t(x0.shape[0], x0.device) if t is None else t
        noise = torch.randn_like(x0) if noise is None else noise
        noise = immiscible_noise(x0, noise) if immiscible else noise
        target = noise if self.target == "eps" else x0 if self.target == "x0" else self.v_target(x0, t, noise)
        seen = noise + perturb * torch.randn_like(x0) if perturb else noise
        pred = model(self.q_sample(x0, t, seen), t, y).float()
        if pred.shape != target.shape:  # broadcasting them would train on garbage, with only torch's warning
            raise ValueError(f"the model's prediction {list(pred.shape)} is not shaped as its input {list(x0.shape)}")
        return F.mse_loss(pred, target) if self.loss == "mse" else F.l1_loss(pred, target)

    @torch.no_grad()
    def predict(self, model, x_t, t, y=None, guidance=0.0):
        """(eps, x0) at x_t, x0 clipped to [-1, 1] and eps made consistent with it, as the paper's sampler does.
        Guidance w (Ho & Salimans 2022, eq. 6): eps = (1 + w) eps(x_t, y) - w eps(x_t, null), in one batched call."""
        t = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
        if guidance and y is None:
            raise ValueError("guidance needs labels y: it steers the samples towards their class")
        if guidance:  # linear, so guiding x0 or v is the same as guiding eps
            y = torch.as_tensor(y, device=x_t.device).expand(len(x_t))  # one label for the batch, as the network takes
            cond, uncond = model(torch.cat([x_t, x_t]), t.repeat(2), torch.cat([y, torch.full_like(y, -1)])).chunk(2)
            out = (1 + guidance) * cond.float() - guidance * uncond.float()
        else:
            out = model(x_t, t, y).float()
        x0 = self.x0_from_prediction(x_t, t, out).clamp(-1, 1)
        return self.predict_eps_from_x0(x_t, t, x0), x0

    def ddpm_step(self, model, x, t, y=None, guidance=0.0, variance="beta", generator=None):
        """One step of Algorithm 2: x_{t-1} ~ p(x_{t-1} | x_t), and the predicted x_0. sigma_t^2 = beta_t
        ('beta') or beta-tilde_t ('beta_tilde'); the paper found both similar."""
        if variance not in ("beta", "beta_tilde"):
            raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
        _, x0 = self.predict(model, x, t, y, guidance)
        mean, _ = self.q_posterior_mean_variance(x0, x, t)
        if t == 0:  # no noise is added at the last step
            return mean, x0
        var = (self.betas if variance == "beta" else self.posterior_variance)[t].item()
        return mean + math.sqrt(var) * randn(x.shape, generator, x.device), x0

    def ddpm_loop(self, model, x, y=None, guidance=0.0, variance="beta", generator=None, t_start=None):
        """Algorithm 2: ancestral sampling from x = x_T (or x_{t_start}, an image noised to that step) to x_0."""
        for t in range(self.T - 1 if t_start is None else t_start, -1, -1):
            x, x0 = self.ddpm_step(model, x, t, y, guidance, variance, generator)
            yield t, x, x0

    def inpaint_loop(self, model, image, known, resample=1, y=None, guidance=0.0, generator=None, jump=10):
        """RePaint (Lugmayr et al. 2022, unconditional model) along `repaint_schedule(T, jump, resample)`, yielding at
        each reverse step, their Algorithm 1's: the `known` pixels (a {0, 1} or bool mask broadcastable to `image`) from
        q(x_{t-1} | x_0 = image), the rest from the model's step (eq. 8). Each jump back up re-noises all of x by
        q(x_{t+jump} | x_t) (sec. 4.2), so the generated region gets `resample` passes to agree with the known one."""
        ts = repaint_schedule(self.T, jump, resample)
        x = randn(image.shape, generator, image.device)
        for t, t_next in zip(ts, ts[1:]):
            noise = randn(image.shape, generator, image.device) if t_next >= 0 else None
            if t_next > t:  # a jump back up
                x = self.q_sample_from(x, t, t_next, noise)
                continue
            t_known = torch.full((len(image),), t_next, device=image.device)
            x_known = image if noise is None else self.q_sample(image, t_known, noise)  # the last step adds no noise
            x_unknown, x0 = self.ddpm_step(model, x, t, y, guidance, generator=generator)
            x = torch.where(known.bool(), x_known, x_unknown)
            yield t, x, x0

    def noised_blend(self, a, b, t, weight=0.5, noise="shared", generator=None):
        """Images a and b [N, ...] blended, (1 - weight) a + weight b, and noised to step t. 'shared': one noise,
        q_sample of the pixel blend, a proper x_t ~ q(x_t | blend). 'separate' (seed 000's way): a and b noised
        each with its own noise, then blended; the blend's noise has std sqrt((1 - w)^2 + w^2) sqrt(1 - alpha-bar_t),
        less than the sqrt(1 - alpha-bar_t) of x_t (0.71 of it at w = 0.5): the network, told t, gets less noise."""
        if noise not in ("shared", "separate"):
            raise ValueError(f"noise must be 'shared' or 'separate', got {noise!r}")
        t = torch.full((len(a),), t, device=a.device)
        if noise == "shared":
            return self.q_sample((1 - weight) * a + weight * b, t, randn(a.shape, generator, a.device))
        noised_a = self.q_sample(a, t, randn(a.shape, generator, a.device))
        return (1 - weight) * noised_a + weight * self.q_sample(b, t, randn(b.shape, generator, b.device))

    def mix(self, model, a, b, t, weight=0.5, generator=None, noise="shared"):
        """The blend of two images noised to step t (noised_blend, with `noise` shared or separate) denoised from t
        (ancestral). Small t keeps the blend; large t lets the model redraw it."""
        x = self.noised_blend(a, b, t, weight, noise, generator)
        for _, x, _ in self.ddpm_loop(model, x, generator=generator, t_start=t):
            pass
        return x.clamp(-1, 1)

    def ddim_loop(self, model, x, steps=None, eta=0.0, y=None, guidance=0.0, generator=None):
        """DDIM (Song et al. 2021, eq. 12) on `steps` (default 50, or T if fewer) spaced timesteps; eta=0 is
        deterministic, eta=1 DDPM-like."""
        if not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        ts = spaced_timesteps(self.T, min(50, self.T) if steps is None else steps)
        for i, t in enumerate(ts):
            eps, x0 = self.predict(model, x, t, y, guidance)
            a_t = self.alphas_cumprod[t].item()
            a_prev = self.alphas_cumprod[ts[i + 1]].item() if i + 1 < len(ts) else 1.0  # the last step lands on x_0
            sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
            x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma ** 2) * eps
            if sigma > 0:
                x = x + sigma * randn(x.shape, generator, x.device)
            yield t, x, x0

    def logsnr_timesteps(self, steps):
        """`steps` timesteps from T-1 down whose lambda_t are evenly spaced, as DPM-Solver's authors space them for
        small images (Lu et al. 2022, sec. 3.3): the grid runs from lambda at T-1 (at 0.9946 T for the cosine
        schedule, their truncated end: its clipped last steps drop lambda from -4.9 to -9.9) up to lambda_0, and the
        first step starts from pure noise at T-1. Fewer when two would round to the same step."""
        start = self.lambdas[int(0.9946 * self.T) if self.schedule == "cosine" else self.T - 1].item()
        grid = torch.linspace(start, self.lambdas[0].item(), steps + 1, dtype=torch.float64)[1:-1]  # the last: x_0
        ts = [self.T - 1] + (grid[:, None] - self.lambdas.cpu()[None]).abs().argmin(1).tolist()
        return sorted(set(ts), reverse=True)

    def dpm_solver_step(self, x, t, preds, order=2):
        """One step of DPM-Solver++ (Lu et al. 2022) from x at step s to step t < s, given `preds`, the (step, x_0)
        predicted at s and the steps before it, newest first: order 1 (or one prediction) is DDIM; 2, their 2M
        (Algorithm 2, r = h_prev / h); 3, 3M: x_t = sigma_t / sigma_s x_s + sigma_t int e^lambda x_0(lambda) dlambda
        with x_0 expanded to second order in lambda, its derivatives from the last three predictions, integrated
        exactly (phi_k below), so the step is exact for x_0 quadratic in lambda."""
        sigma, lam = self.sqrt_one_minus_alphas_cumprod, self.lambdas
        (s, x0), order = preds[0], min(order, len(preds))
        h, a_t = (lam[t] - lam[s]).item(), self.sqrt_alphas_cumprod[t].item()
        phi1 = math.expm1(-h)
        x = (sigma[t] / sigma[s]).item() * x - a_t * phi1 * x0
        if order == 1:
            return x
        h0 = (lam[s] - lam[preds[1][0]]).item()
        d1 = (x0 - preds[1][1]) * h / h0  # h x_0', at the middle of the last step
        if order == 2:
            return x - a_t * phi1 * d1 / 2
        h1 = (lam[preds[1][0]] - lam[preds[2][0]]).item()
        d2 = (d1 - (preds[1][1] - preds[2][1]) * h / h1) * 2 * h / (h0 + h1)  # h^2 x_0''
        d1 = d1 + d2 * h0 / (2 * h)  # h x_0' at s: moved from the middle of the last step
        phi2 = phi1 / h + 1
        return x + a_t * phi2 * d1 - a_t * (phi2 / h - 0.5) * d2

    def dpm_solver_loop(self, model, x, steps=None, y=None, guidance=0.0, order=2, spacing="time"):
        """DPM-Solver++ of `order` (`dpm_solver_step`) on `steps` (default 20, or T if fewer) timesteps spaced evenly in
        t ('time', trailing) or in lambda ('logsnr'). The first steps are of lower order, the first DDIM; the last
        lands on sigma = 0, where the update is x_0 itself."""
        if order not in (1, 2, 3) or spacing not in ("time", "logsnr"):
            raise ValueError(f"order must be 1, 2 or 3 and spacing 'time' or 'logsnr', got {order} and {spacing!r}")
        steps = min(20, self.T) if steps is None else steps
        ts = spaced_timesteps(self.T, steps) if spacing == "time" else self.logsnr_timesteps(steps)
        preds = []
        for i, s in enumerate(ts):
            _, x0 = self.predict(model, x, s, y, guidance)
            preds = [(s, x0)] + preds[:order - 1]
            x = x0 if i == len(ts) - 1 else self.dpm_solver_step(x, ts[i + 1], preds, order)
            yield s, x, x0

    def loop(self, model, x, sampler="ddim", steps=None, eta=0.0, variance="beta", y=None, guidance=0.0,
             generator=None, order=2, spacing="time"):
        """The named sampler's steps from x_T = x, each yielding (t, x after the step, predicted x_0)."""
        if sampler not in ("ddpm", "ddim", "dpm++"):
            raise ValueError(f"unknown sampler {sampler!r}; choose ddpm, ddim or dpm++")
        if (sampler == "ddpm" and steps not in (None, self.T)) or (eta and sampler != "ddim") or \
                (variance != "beta" and sampler != "ddpm") or ((order, spacing) != (2, "time") and sampler != "dpm++"):
            raise ValueError(f"sampler {sampler!r}, steps {steps}, eta {eta}, variance {variance!r}, order {order}, "
                             f"spacing {spacing!r}: eta is ddim's, variance ddpm's, order and spacing dpm++'s, and "
                             "ddpm takes all T steps")
        if sampler == "ddpm":
            return self.ddpm_loop(model, x, y, guidance, variance, generator)
        if sampler == "ddim":
            return self.ddim_loop(model, x, steps, eta, y, guidance, generator)
        return self.dpm_solver_loop(model, x, steps, y, guidance, order, spacing)

    @torch.no_grad()
    def sample(self, model, shape, device="cpu", generator=None, **kwargs):
        """x_T ~ N(0, I) of `shape` (`generator`: one, or one per sample, see `randn`) run through `loop` to x_0."""
        for _, x, _ in self.loop(model, randn(shape, generator, device), generator=generator, **kwargs):
            pass
        return x.clamp(-1, 1)

    # --- The variational bound on -log p(x_0) (eq. 5): the paper's NLL in Table 1

    def prior_kl(self, x0):
        """L_T = KL(q(x_T | x_0) || N(0, I)) of each element of x0, in nats: eq. 4 at t = T against the prior."""
        t = torch.full((len(x0),), self.T - 1, device=x0.device)
        return normal_kl(_at(self.sqrt_alphas_cumprod, t, x0) * x0, _at(1 - self.alphas_cumprod, t, x0), 0.0, 1.0)

    def bound_term(self, model, x0, t, noise, y=None, variance="beta"):
        """Eq. 5's term of step t (0-based: the paper's t + 1) for each element of x0, in nats, at x_t = q_sample(x0,
        t, noise): t > 0, KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); t = 0, -log p(x_0 | x_1), the discretized
        decoder (eq. 13). p's mean is eq. 7's posterior mean at the model's x_0, unclipped (clipping is a sampler's
        choice, not the model's density); its variance sigma_t^2 is beta_t or beta-tilde_t (`variance`). The decoder's
        is the paper's beta-tilde_2 (posterior_variance[1]) for both, as Ho et al.'s and Nichol & Dhariwal's code
        have it: beta-tilde_1 is 0."""
        if variance not in ("beta", "beta_tilde"):
            raise ValueError(f"variance must be 'beta' or 'beta_tilde', got {variance!r}")
        tt = torch.full((len(x0),), t, device=x0.device)
        x_t = self.q_sample(x0, tt, noise)
        out = model(x_t.float(), tt, y).to(x_t.dtype)  # a float32 network; the bound's arithmetic in x0's dtype
        mean, _ = self.q_posterior_mean_variance(self.x0_from_prediction(x_t, tt, out), x_t, tt)  # eq. 11 for eps
        if t == 0:  # the posterior mean at t = 0 is the predicted x_0 itself (coef1 = 1, coef2 = 0)
            return -discretized_gaussian_log_likelihood(x0, mean, self.posterior_variance[1].sqrt().item())
        true_mean, true_var = self.q_posterior_mean_variance(x0, x_t, tt)
        sigma2 = (self.betas if variance == "beta" else self.posterior_variance)[t].item()
        return normal_kl(true_mean, true_var, mean, sigma2)

    @torch.no_grad()
    def nll_terms(self, model, x0, y=None, variance="beta", generator=None):
        """The bound L = L_T + sum_{t>1} L_{t-1} + L_0 >= -log p(x_0) (eq. 5) of images x0 [N, ...] on 256 levels in
        [-1, 1], term by term, each in bits per dimension of each image: yields (T, prior L_T), then (t, bound_term)
        for every t from T - 1 down to 0 with one draw of x_t (noise from `generator`: see `randn`). Their sum is each
        image's NLL bound in bits/dim. Computed in float64; the network runs as its input's dtype allows (autocast)."""
        x0 = x0.double()
        bits = 1 / (math.log(2) * x0[0].numel())  # nats summed over an image's dimensions -> bits/dim

        def per_image(nats):
            return nats.flatten(1).sum(1) * bits
        yield self.T, per_image(self.prior_kl(x0))
        for t in range(self.T - 1, -1, -1):
            noise = randn(x0.shape, generator, x0.device).double()
            yield t, per_image(self.bound_term(model, x0, t, noise, y, variance))
