"""Gaussian diffusion as DiT trains and samples it (the ADM formulation).

Linear betas, ε-prediction, optionally learned variance (interpolated between the posterior variance
and β_t) trained with the hybrid loss MSE + VLB. Schedules are computed in float64 and gathered per
timestep, so a respaced diffusion is the same class built from a subset of ᾱ_t.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
from robuq.core.errors import RobuqError

Denoiser = Callable[..., torch.Tensor]


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """ADM's linear schedule, rescaled so that any step count spans the same noise range as 1000 steps."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | Iterable[int]) -> list[int]:
    """Which of the original timesteps a respaced sampler visits.

    ``"250"`` or ``250`` takes 250 evenly spaced steps; ``"ddim50"`` takes the strided set DDIM uses;
    ``"10,15,20"`` splits the range into three equal sections with that many steps each.
    """
    if isinstance(section_counts, int):
        section_counts = str(section_counts)
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise RobuqError(f"cannot take exactly {desired} strided steps from {num_timesteps}")
        section_counts = [int(c) for c in section_counts.split(",")]
    counts = list(section_counts)
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise RobuqError(f"cannot take {count} steps from a section of {size} timesteps")
        if count <= 1:
            stride = 1.0
        else:
            stride = (size - 1) / (count - 1)
        kept.extend(start + round(stride * j) for j in range(count))
        start += size
    return sorted(set(kept))


def _gather(values: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    out = torch.from_numpy(values).to(device=t.device)[t].float()
    return out.view(-1, *([1] * (ndim - 1)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 bins under a Gaussian, elementwise."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log((cdf_plus - cdf_min).clamp(min=1e-12))),
    )
    return log_probs


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=list(range(1, x.ndim)))


class GaussianDiffusion:
    """Forward process, posterior, model-parameterised reverse process, losses and samplers.

    ``timestep_map`` translates the indices of a respaced diffusion back to the original timesteps that
    the denoiser was trained on; for the full diffusion it is the identity.
    """

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, timestep_map: Iterable[int] | None = None):
        self.betas = betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise RobuqError("betas must be a 1-D array in (0, 1]")
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = np.arange(self.num_timesteps) if timestep_map is None else np.asarray(list(timestep_map))

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The posterior variance is 0 at t = 0; reuse the t = 1 value so its log stays finite.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # -- forward process -------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            _gather(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
        )

    def q_posterior_mean_variance(
        self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        n = x_t.ndim
        mean = _gather(self.posterior_mean_coef1, t, n) * x_start + _gather(self.posterior_mean_coef2, t, n) * x_t
        return mean, _gather(self.posterior_variance, t, n), _gather(self.posterior_log_variance_clipped, t, n)

    # -- reverse process -------------------------------------------------------------------------
    def _scale_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.timestep_map).to(t.device)[t]

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        n = x_t.ndim
        return (
            _gather(self.sqrt_recip_alphas_cumprod, t, n) * x_t - _gather(self.sqrt_recipm1_alphas_cumprod, t, n) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x_start: torch.Tensor) -> torch.Tensor:
        n = x_t.ndim
        return (_gather(self.sqrt_recip_alphas_cumprod, t, n) * x_t - x_start) / _gather(
            self.sqrt_recipm1_alphas_cumprod, t, n
        )

    def split_output(
        self, model_output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """ε and the log-variance of p(x_{t-1} | x_t) from the raw network output."""
        C = x_t.shape[1]
        if self.learn_sigma:
            eps, var_values = model_output[:, :C], model_output[:, C : 2 * C]
            min_log = _gather(self.posterior_log_variance_clipped, t, x_t.ndim)
            max_log = _gather(np.log(self.betas), t, x_t.ndim)
            frac = (var_values + 1) / 2  # the network outputs v in [-1, 1]
            return eps, frac * max_log + (1 - frac) * min_log
        # Fixed "large" variance (β_t, with the posterior value at t = 0), as ADM does without learned sigma.
        variance = np.append(self.posterior_variance[1], self.betas[1:])
        return model_output[:, :C], _gather(np.log(variance), t, x_t.ndim)

    def p_mean_variance(
        self,
        model: Denoiser,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        model_output = model(x_t, self._scale_timesteps(t), **(model_kwargs or {}))
        eps, log_variance = self.split_output(model_output, x_t, t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    # -- training --------------------------------------------------------------------------------
    def vb_terms_bpd(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The variational-bound term for each sample, in bits per dimension."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        eps, log_variance = self.split_output(model_output, x_t, t)
        pred_xstart = self.predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance)) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model: Denoiser,
        x_start: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-sample losses: "mse" on ε, "vb" when sigma is learned, and their sum "loss"."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise)
        model_output = model(x_t, self._scale_timesteps(t), **(model_kwargs or {}))
        return self.losses_from_output(model_output, x_start, x_t, t, noise)

    def losses_from_output(
        self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        C = x_start.shape[1]
        terms = {"mse": mean_flat((noise - model_output[:, :C]) ** 2)}
        if self.learn_sigma:
            # The VLB trains only the variance: the mean's gradient comes from the MSE term alone.
            frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
            # Scale as ADM does, so that the weight stays 1/1000 relative to the MSE for any step count.
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t) * self.num_timesteps / 1000.0
            terms["loss"] = terms["mse"] + terms["vb"]
        else:
            terms["loss"] = terms["mse"]
        return terms

    # -- sampling --------------------------------------------------------------------------------
    def ddpm_sample(
        self,
        model: Denoiser,
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Ancestral sampling from x_T = ``noise`` through every timestep of this diffusion."""
        x = noise
        for i in _steps(self.num_timesteps, progress, "DDPM"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
            if i > 0:
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * z
            else:
                x = out["mean"]
        return x

    def ddim_sample(
        self,
        model: Denoiser,
        noise: torch.Tensor,
        generator: torch.Generator | None = None,
        eta: float = 0.0,
        clip_denoised: bool = True,
        model_kwargs: dict | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """DDIM (Song et al. 2021); ``eta = 0`` is deterministic given x_T."""
        x = noise
        for i in _steps(self.num_timesteps, progress, "DDIM"):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            with torch.no_grad():
                out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
            eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
            alpha_bar = _gather(self.alphas_cumprod, t, x.ndim)
            alpha_bar_prev = _gather(self.alphas_cumprod_prev, t, x.ndim)
            sigma = (
                eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
            )
            mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
            if i > 0 and eta > 0:
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
                mean = mean + sigma * z
            x = mean
        return x


def _steps(num_timesteps: int, progress: bool, desc: str) -> Iterable[int]:
    indices = range(num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        return tqdm(indices, desc=desc, leave=False)
    return indices


def create_diffusion(
    timestep_respacing: str | int | None = None, learn_sigma: bool = True, num_timesteps: int = 1000
) -> GaussianDiffusion:
    """The diffusion DiT uses; ``timestep_respacing`` (e.g. 250 or "ddim50") gives a respaced sampler."""
    betas = linear_betas(num_timesteps)
    if not timestep_respacing:
        return GaussianDiffusion(betas, learn_sigma=learn_sigma)
    kept = space_timesteps(num_timesteps, timestep_respacing)
    alphas_cumprod = np.cumprod(1.0 - betas)
    new_betas, last = [], 1.0
    for i in kept:
        new_betas.append(1 - alphas_cumprod[i] / last)
        last = alphas_cumprod[i]
    return GaussianDiffusion(np.array(new_betas), learn_sigma=learn_sigma, timestep_map=kept)
