import numpy as np
import pytest
import torch

from robuq.diffusion.gaussian import create_diffusion, linear_betas, normal_kl, space_timesteps
from robuq.sample.generate import generate


def test_linear_schedule_endpoints():
    betas = linear_betas(1000)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02) and len(betas) == 1000


def test_q_sample_statistics():
    d = create_diffusion()
    t = torch.full((200_000,), 300)
    x0 = torch.full((200_000, 1), 0.7)
    xt = d.q_sample(x0, t, torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0)))
    ab = d.alphas_cumprod[300]
    assert xt.mean().item() == pytest.approx(np.sqrt(ab) * 0.7, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - ab, rel=1e-2)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_matches_bayes_rule(t):
    d = create_diffusion()
    beta, alpha = d.betas[t], 1 - d.betas[t]
    ab_prev = d.alphas_cumprod[t - 1]
    x0, xt = torch.tensor([[0.3, -0.8]]), torch.tensor([[1.1, 0.2]])
    precision = alpha / beta + 1 / (1 - ab_prev)
    var = 1 / precision
    mean = var * (np.sqrt(alpha) / beta * xt.double() + np.sqrt(ab_prev) / (1 - ab_prev) * x0.double())
    got_mean, got_var, got_logvar = d.q_posterior_mean_variance(x0, xt, torch.tensor([t]))
    assert torch.allclose(got_mean.double(), mean, atol=1e-5)
    assert got_var.item() == pytest.approx(var, rel=1e-5)
    assert got_logvar.item() == pytest.approx(np.log(var), rel=1e-5)


def test_space_timesteps():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert space_timesteps(100, "10") == [0, 11, 22, 33, 44, 55, 66, 77, 88, 99]
    assert len(space_timesteps(1000, 250)) == 250
    assert space_timesteps(1000, "10,20")[:2] == [0, 55]
    with pytest.raises(ValueError):
        space_timesteps(10, "20")


def test_respaced_diffusion_keeps_alphas_cumprod():
    full, spaced = create_diffusion(), create_diffusion(50)
    kept = space_timesteps(1000, 50)
    assert np.allclose(spaced.alphas_cumprod, full.alphas_cumprod[kept])
    assert list(spaced.timestep_map) == kept
    seen = []
    spaced.p_mean_variance(
        lambda x, t: (seen.append(t), torch.zeros(1, 2, 1))[1], torch.zeros(1, 1, 1), torch.tensor([3])
    )
    assert seen[0].item() == kept[3]  # the denoiser sees the original timestep


def test_learned_variance_interpolates_between_bounds():
    d = create_diffusion()
    x, t = torch.zeros(1, 1, 2), torch.tensor([400])
    _, low = d.split_output(torch.cat([x, -torch.ones_like(x)], 1), x, t)
    _, high = d.split_output(torch.cat([x, torch.ones_like(x)], 1), x, t)
    assert low.flatten()[0].item() == pytest.approx(d.posterior_log_variance_clipped[400], rel=1e-5)
    assert high.flatten()[0].item() == pytest.approx(np.log(d.betas[400]), rel=1e-5)


def test_training_losses_of_a_perfect_denoiser():
    d = create_diffusion(learn_sigma=False)
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    noise = torch.randn_like(x0)
    perfect = lambda x, t: noise  # noqa: E731
    losses = d.training_losses(perfect, x0, torch.tensor([0, 5, 500, 999]), noise)
    assert torch.allclose(losses["loss"], torch.zeros(4), atol=1e-10)


def test_hybrid_loss_terms_and_gradient_split():
    d = create_diffusion(learn_sigma=True)
    x0 = torch.rand(3, 1, 4, 4) * 2 - 1
    out = torch.zeros(3, 2, 4, 4, requires_grad=True)
    losses = d.losses_from_output(
        out, x0, d.q_sample(x0, torch.tensor([0, 1, 700])), torch.tensor([0, 1, 700]), torch.randn_like(x0)
    )
    assert set(losses) == {"mse", "vb", "loss"} and torch.isfinite(losses["vb"]).all()
    losses["vb"].sum().backward()
    assert out.grad[:, :1].abs().sum() == 0 and out.grad[:, 1:].abs().sum() > 0  # VLB trains only the variance


def test_normal_kl_closed_form():
    m1, lv1, m2, lv2 = torch.tensor(0.5), torch.tensor(0.2), torch.tensor(-0.1), torch.tensor(-0.3)
    s1, s2 = torch.exp(0.5 * lv1), torch.exp(0.5 * lv2)
    closed = torch.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    assert normal_kl(m1, lv1, m2, lv2).item() == pytest.approx(closed.item(), rel=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_is_deterministic_under_a_seed(tiny_dit, sampler):
    labels = torch.tensor([0, 3, 7])
    a = generate(tiny_dit, labels, 3, sampler, steps=5, cfg_scale=2.0, seed=1, progress=False)
    b = generate(tiny_dit, labels, 3, sampler, steps=5, cfg_scale=2.0, seed=1, progress=False)
    c = generate(tiny_dit, labels, 3, sampler, steps=5, cfg_scale=2.0, seed=2, progress=False)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 1, 8, 8) and a.abs().max() <= 1.0
