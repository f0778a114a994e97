"""Math tests for the plain-torch inversion package (DDIM and edit-friendly DDPM, sigma space)."""

import math
from pathlib import Path

import pytest
import torch

from attention_lab.inversion import (
    Inversion,
    ddim_invert,
    ddim_sample,
    ddpm_invert,
    ddpm_replay,
    ddpm_step_coefficients,
)

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- schedules


def sd_discrete_sigmas() -> torch.Tensor:
    """SD1.x's 1000 training sigmas: betas linear in sqrt space 0.00085 → 0.012, σ = √((1−ᾱ)/ᾱ)."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5


def ddim_uniform_descending(steps: int) -> torch.Tensor:
    """n evenly spaced timesteps 1, 1+1000//n, … (like ComfyUI's ddim_uniform), descending, trailing 0."""
    sigmas = sd_discrete_sigmas()
    timesteps = range(1, 1000, 1000 // steps)
    picked = [float(sigmas[t]) for t in timesteps][::-1] + [0.0]
    return torch.tensor(picked, dtype=torch.float32)


def ddim_uniform_ascending(steps: int) -> torch.Tensor:
    return ddim_uniform_descending(steps).flip(0)


# --------------------------------------------------------------------------- model stand-ins

MU, S = 0.3, 0.8  # data x0 ~ N(MU, S²) per element


def per_batch(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A ComfyUI-style [B] sigma, shaped to broadcast against x."""
    return sigma.to(x).view(-1, *([1] * (x.ndim - 1)))


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The exact denoiser E[x0 | x0 + σε] for x0 ~ N(MU, S²): MU + S²/(S²+σ²)·(x − MU)."""
    s2 = per_batch(sigma, x) ** 2
    return MU + S**2 / (S**2 + s2) * (x - MU)


def wrong_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A deliberately bad model: ignores sigma, squashes x."""
    return 0.5 * torch.tanh(x) + 0.1


def toy_eps_theta(z: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear 'ε-model' of the VP latent z and ᾱ_t (alpha_bar broadcastable to z)."""
    return torch.tanh(1.5 * z + 0.3) * (0.5 + alpha_bar) + 0.2 * torch.sin(2.0 * z) * (1.0 - alpha_bar)


def toy_eps_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """toy_eps_theta wrapped the way ComfyUI wraps an ε-model: x − σ·ε_θ(x/√(1+σ²), ᾱ(σ))."""
    s = per_batch(sigma, x)
    alpha_bar = 1.0 / (1.0 + s**2)
    return x - s * toy_eps_theta(x * alpha_bar.sqrt(), alpha_bar)


def half_precision_denoiser(dtype):
    def denoise(x, sigma):
        return gaussian_denoiser(x.to(dtype), sigma.to(dtype))  # returns `dtype`

    return denoise


def clean_latent(seed: int = 0, shape=(2, 4, 8, 8)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return MU + S * torch.randn(shape, generator=g)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# --------------------------------------------------------------------------- DDIM


def ddim_round_trip_error(steps: int) -> float:
    x0 = clean_latent()
    inv = ddim_invert(gaussian_denoiser, x0, ddim_uniform_ascending(steps))
    rec = ddim_sample(gaussian_denoiser, inv.x_T, inv.sampling_sigmas)
    return max_abs(rec, x0)


def test_ddim_round_trip_error_falls_with_steps():
    errors = {n: ddim_round_trip_error(n) for n in (10, 50, 200)}
    print("DDIM round-trip max|err|:", errors)  # measured: 10 -> 0.211, 50 -> 0.0376, 200 -> 0.0092
    assert errors[10] > errors[50] > errors[200]
    assert errors[50] < 0.05  # data scale S = 0.8
    # First-order convergence: 20x the steps buys well over 10x the accuracy.
    assert errors[10] / errors[200] > 15


def test_ddim_inversion_follows_the_probability_flow_ode():
    # For Gaussian data the PF-ODE dx/dσ = (x − D)/σ solves to x(σ) − MU = (x0 − MU)·√(S²+σ²)/S.
    x0 = clean_latent()
    rel = {}
    for steps in (50, 200):
        inv = ddim_invert(gaussian_denoiser, x0, ddim_uniform_ascending(steps))
        sigma_max = float(inv.sigmas[-1])
        exact = MU + (x0 - MU) * math.sqrt(S**2 + sigma_max**2) / S
        rel[steps] = max_abs(inv.x_T, exact) / float((exact - MU).abs().max())
    print("DDIM inversion vs exact ODE, relative:", rel)  # measured: 50 -> 0.026, 200 -> 0.0079
    assert rel[200] < rel[50] < 0.04
    assert rel[200] < 0.01


def test_ddim_inversion_step_matches_the_vp_equation():
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    inv = ddim_invert(toy_eps_denoiser, x0, ddim_uniform_ascending(25))
    assert inv.kind == "ddim" and inv.latents.shape == (26, 2, 4, 8, 8)
    assert torch.equal(inv.latents[0], x0) and float(inv.sigmas[0]) == 0.0

    sig = inv.sigmas.double()
    alpha_bar = 1.0 / (1.0 + sig**2)
    z_ref = x0.double()  # a full VP-space trajectory in float64, alongside the per-step check
    worst_step, worst_traj = 0.0, 0.0
    for k in range(inv.num_steps):
        a_k, a_next = alpha_bar[k], alpha_bar[k + 1]

        def vp_step(z):
            # ε = ε_θ(z_k, t_{k+1});  z_{k+1} = √ᾱ_{k+1}(z_k − √(1−ᾱ_k)ε)/√ᾱ_k + √(1−ᾱ_{k+1})ε
            eps = toy_eps_theta(z, a_next)
            return a_next.sqrt() * (z - (1 - a_k).sqrt() * eps) / a_k.sqrt() + (1 - a_next).sqrt() * eps

        z_k = inv.latents[k].double() * a_k.sqrt()  # sigma space → VP: divide by √(1+σ²)
        z_next = inv.latents[k + 1].double() * a_next.sqrt()
        worst_step = max(worst_step, max_abs(vp_step(z_k), z_next))
        z_ref = vp_step(z_ref)
        worst_traj = max(worst_traj, max_abs(z_ref, z_next))
    print("DDIM sigma-space vs VP: per step", worst_step, "whole trajectory", worst_traj)
    assert worst_step < 1e-5
    assert worst_traj < 1e-4


def test_ddim_inversion_may_start_above_sigma_zero():
    # diffusers-based papers (set_alpha_to_one=False) treat the clean latent as sitting at
    # ᾱ = alphas_cumprod[0], i.e. σ ≈ 0.029 instead of 0: a schedule starting there is accepted.
    x0 = clean_latent()
    sigmas = ddim_uniform_ascending(50)
    sigmas[0] = float(sd_discrete_sigmas()[0])
    inv = ddim_invert(gaussian_denoiser, x0, sigmas)
    rec = ddim_sample(gaussian_denoiser, inv.x_T, inv.sampling_sigmas)
    assert torch.equal(inv.x_0, x0) and max_abs(rec, x0) < 0.05


def test_ddim_sample_is_an_euler_step_and_ends_at_x0_hat():
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5)) * 3
    sigmas = torch.tensor([3.0, 1.0, 0.0])
    out = ddim_sample(gaussian_denoiser, x, sigmas)
    x0_hat = gaussian_denoiser(x, torch.tensor([3.0]))
    x1 = x0_hat + 1.0 * (x - x0_hat) / 3.0
    assert max_abs(out, gaussian_denoiser(x1, torch.tensor([1.0]))) < 1e-6


# --------------------------------------------------------------------------- DDPM


def test_ddpm_step_coefficients_match_vp_posterior():
    for sigma, sigma_prev in [(14.6, 13.0), (2.0, 1.5), (0.134, 0.0414), (5.0, 0.0)]:
        down, up = ddpm_step_coefficients(sigma, sigma_prev)
        # closed form = k-diffusion's ancestral step, eta = 1
        assert up == pytest.approx(sigma_prev * math.sqrt(sigma**2 - sigma_prev**2) / sigma, rel=1e-9, abs=1e-12)
        assert down == pytest.approx(sigma_prev**2 / sigma, rel=1e-9, abs=1e-12)
        a_t, a_p = 1 / (1 + sigma**2), 1 / (1 + sigma_prev**2)
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        assert up * math.sqrt(a_p) == pytest.approx(math.sqrt(var), rel=1e-9, abs=1e-12)
        assert down * math.sqrt(a_p) == pytest.approx(math.sqrt(max(1 - a_p - var, 0.0)), rel=1e-9, abs=1e-12)


def test_ddpm_noise_maps_match_the_vp_equations():
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    inv = ddpm_invert(toy_eps_denoiser, x0, ddim_uniform_descending(20), torch.Generator().manual_seed(0))
    assert inv.kind == "ddpm" and inv.noise_maps.shape == (20, 2, 4, 8, 8)
    sig = inv.sigmas.double()
    worst = 0.0
    for k in range(inv.num_steps - 1):  # the last map (to σ = 0) is 0 by definition
        a_t, a_p = 1 / (1 + sig[k] ** 2), 1 / (1 + sig[k + 1] ** 2)
        z_t = inv.latents[k].double() * a_t.sqrt()
        z_prev = inv.latents[k + 1].double() * a_p.sqrt()
        eps = toy_eps_theta(z_t, a_t)
        x0_hat = (z_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        var = (1 - a_p) / (1 - a_t) * (1 - a_t / a_p)
        mu = a_p.sqrt() * x0_hat + (1 - a_p - var).sqrt() * eps
        z_ref = (z_prev - mu) / var.sqrt()
        worst = max(worst, max_abs(z_ref, inv.noise_maps[k]) / max(1.0, float(z_ref.abs().max())))
    print("DDPM noise maps sigma-space vs VP, relative:", worst)
    assert worst < 1e-5
    assert torch.count_nonzero(inv.noise_maps[-1]) == 0


def test_ddpm_latents_are_independent_noisings_of_x0():
    x0 = clean_latent(shape=(4, 4, 16, 16))
    inv = ddpm_invert(gaussian_denoiser, x0, ddim_uniform_descending(10), torch.Generator().manual_seed(7))
    assert torch.equal(inv.latents[-1], x0) and float(inv.sigmas[-1]) == 0.0
    noises = [(inv.latents[k] - x0) / float(inv.sigmas[k]) for k in range(inv.num_steps)]
    for noise in noises:
        assert 0.9 < float(noise.std()) < 1.1
    assert abs(float((noises[0] * noises[1]).mean())) < 0.1  # independent draws, not one trajectory


@pytest.mark.parametrize("denoise", [gaussian_denoiser, wrong_denoiser], ids=["analytic", "wrong"])
def test_ddpm_replay_reconstructs_exactly(denoise):
    x0 = clean_latent()
    inv = ddpm_invert(denoise, x0, ddim_uniform_descending(50), torch.Generator().manual_seed(1))
    rec = ddpm_replay(denoise, inv)
    print(f"DDPM replay max|err| ({denoise.__name__}):", max_abs(rec, x0))  # measured: 0.0 / 2.4e-7
    assert rec.dtype == torch.float32
    assert max_abs(rec, x0) <= 1e-5
    # Without the final residual the last step is the model's own x0_hat (the papers' zs[-1] = 0):
    # close for the exact model (a σ_min-sized error), far off for the wrong one.
    papers = ddpm_replay(denoise, inv, add_final_residual=False)
    assert max_abs(papers, x0) == pytest.approx(float(inv.final_residual.abs().max()), abs=1e-5)


@pytest.mark.parametrize("start", [10, 49])
def test_ddpm_replay_from_a_later_step_reconstructs(start):
    x0 = clean_latent()
    inv = ddpm_invert(wrong_denoiser, x0, ddim_uniform_descending(50), torch.Generator().manual_seed(2))
    calls = []
    rec = ddpm_replay(wrong_denoiser, inv, start=start, callback=lambda s, t: calls.append((s, t)))
    assert max_abs(rec, x0) <= 1e-5
    assert calls == [(i, 50 - start) for i in range(1, 51 - start)]
    # x_start overrides latents[start]
    rec2 = ddpm_replay(wrong_denoiser, inv, start=start, x_start=inv.latents[start].clone())
    assert max_abs(rec2, x0) <= 1e-5


@pytest.mark.parametrize("start", [0, 10, 49])
def test_from_step_replays_what_a_replay_from_that_step_walks(start):
    x0 = clean_latent()
    inv = ddpm_invert(wrong_denoiser, x0, ddim_uniform_descending(50), torch.Generator().manual_seed(2))
    tail = inv.from_step(start)
    assert tail.num_steps == 50 - start and tail.kind == "ddpm"
    assert torch.equal(tail.sampling_sigmas, inv.sampling_sigmas[start:])
    assert torch.equal(tail.latents[0], inv.latents[start]) and torch.equal(tail.x_0, inv.x_0)
    seen, seen_tail = [], []
    full = ddpm_replay(wrong_denoiser, inv, start=start, add_final_residual=False,
                       after_step=lambda k, x: seen.append((k, x.clone())) or x * 0.999)
    from_tail = ddpm_replay(wrong_denoiser, tail, add_final_residual=False,
                            after_step=lambda k, x: seen_tail.append((k, x.clone())) or x * 0.999)
    assert torch.equal(full, from_tail)  # the same steps, bit for bit
    assert [k for k, _ in seen_tail] == [k - start for k, _ in seen]  # step indices counted from start
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen, seen_tail))
    ddim = ddim_invert(gaussian_denoiser, x0, ddim_uniform_ascending(10))
    ddim_tail = ddim.from_step(3)
    assert torch.equal(ddim_tail.sampling_sigmas, ddim.sampling_sigmas[3:])
    assert torch.equal(ddim_tail.x_T, ddim.latent_at(float(ddim.sampling_sigmas[3])))
    for bad in (-1, 50, 1.5, True):
        with pytest.raises(ValueError, match="start: must be an int in \\[0, 49\\]"):
            inv.from_step(bad)


def test_ddpm_invert_is_seeded():
    x0 = clean_latent()
    sigmas = ddim_uniform_descending(10)
    a = ddpm_invert(gaussian_denoiser, x0, sigmas, torch.Generator().manual_seed(9))
    b = ddpm_invert(gaussian_denoiser, x0, sigmas, torch.Generator().manual_seed(9))
    c = ddpm_invert(gaussian_denoiser, x0, sigmas, torch.Generator().manual_seed(10))
    assert torch.equal(a.latents, b.latents) and torch.equal(a.noise_maps, b.noise_maps)
    assert not torch.equal(a.latents[0], c.latents[0])


# --------------------------------------------------------------------------- errors


def nan_denoiser(x, sigma):
    out = gaussian_denoiser(x, sigma)
    return out.masked_fill(sigma.view(-1, 1, 1, 1) > 1.0, float("nan"))


def test_too_few_steps_is_rejected():
    x0 = clean_latent()
    with pytest.raises(ValueError, match=r"sigmas: need at least 2 steps"):
        ddim_invert(gaussian_denoiser, x0, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"sigmas_desc: need at least 2 steps"):
        ddim_sample(gaussian_denoiser, x0, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"sigmas_desc: need at least 2 steps"):
        ddpm_invert(gaussian_denoiser, x0, [1.0, 0.0])


def test_wrongly_sorted_sigmas_are_rejected():
    x0 = clean_latent()
    with pytest.raises(ValueError, match=r"sigmas: .*strictly ascending.*flip"):
        ddim_invert(gaussian_denoiser, x0, ddim_uniform_descending(10))
    with pytest.raises(ValueError, match=r"sigmas_desc: .*strictly descending.*flip"):
        ddim_sample(gaussian_denoiser, x0, ddim_uniform_ascending(10))
    with pytest.raises(ValueError, match=r"sigmas_desc: .*strictly descending"):
        ddpm_invert(gaussian_denoiser, x0, ddim_uniform_ascending(10))
    with pytest.raises(ValueError, match=r"sigmas: .*strictly ascending.*sigma\[2\]"):
        ddim_invert(gaussian_denoiser, x0, [0.0, 1.0, 3.0, 2.0, 4.0])
    with pytest.raises(ValueError, match=r"sigmas: .*strictly ascending"):
        ddim_invert(gaussian_denoiser, x0, [0.0, 1.0, 1.0, 2.0])  # a repeated sigma is a zero step
    with pytest.raises(ValueError, match=r"sigmas_desc: .*end at sigma 0"):
        ddpm_invert(gaussian_denoiser, x0, [3.0, 2.0, 1.0])
    with pytest.raises(ValueError, match=r"sigmas: .*>= 0"):
        ddim_invert(gaussian_denoiser, x0, [-1.0, 1.0, 2.0])


def test_nan_from_the_model_is_reported_with_its_sigma():
    x0 = clean_latent()
    with pytest.raises(ValueError, match=r"the model produced NaN at sigma=1\.\d+.*fp32 or bf16"):
        ddim_invert(nan_denoiser, x0, ddim_uniform_ascending(20))
    sigmas = ddim_uniform_descending(20)  # the first model call, at sigmas[0] = 11.03, already fails
    with pytest.raises(ValueError, match=rf"the model produced NaN at sigma={float(sigmas[0]):.6g}"):
        ddpm_invert(nan_denoiser, x0, sigmas, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"the model produced NaN"):
        ddim_sample(nan_denoiser, x0, ddim_uniform_descending(20))
    inv = ddpm_invert(gaussian_denoiser, x0, ddim_uniform_descending(20), torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"the model produced NaN"):
        ddpm_replay(nan_denoiser, inv)


def test_bad_replay_arguments_are_rejected():
    x0 = clean_latent()
    ddim = ddim_invert(gaussian_denoiser, x0, ddim_uniform_ascending(10))
    with pytest.raises(ValueError, match=r"inversion: .*'ddpm'.*'ddim'"):
        ddpm_replay(gaussian_denoiser, ddim)
    inv = ddpm_invert(gaussian_denoiser, x0, ddim_uniform_descending(10), torch.Generator().manual_seed(0))
    for start in (-1, 10, 1.5):
        with pytest.raises(ValueError, match=r"start: must be an int in \[0, 9\]"):
            ddpm_replay(gaussian_denoiser, inv, start=start)


# --------------------------------------------------------------------------- dtype, progress, result


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_still_yields_float32_latents(dtype):
    denoise = half_precision_denoiser(dtype)
    x0 = clean_latent()
    inv = ddim_invert(denoise, x0.to(dtype), ddim_uniform_ascending(20))
    assert inv.latents.dtype == torch.float32 and torch.isfinite(inv.latents).all()
    rec = ddim_sample(denoise, inv.x_T, inv.sampling_sigmas)
    assert rec.dtype == torch.float32
    assert max_abs(rec, x0) < 0.2  # 20 steps at fp16/bf16 model precision: a coarse sanity bound
    ddpm = ddpm_invert(denoise, x0, ddim_uniform_descending(20), torch.Generator().manual_seed(0))
    assert ddpm.latents.dtype == ddpm.noise_maps.dtype == ddpm.final_residual.dtype == torch.float32
    rec = ddpm_replay(denoise, ddpm)
    assert rec.dtype == torch.float32 and max_abs(rec, x0) <= 1e-5  # replay is exact in any model dtype


def test_callback_is_called_once_per_model_call():
    x0 = clean_latent()
    seen, calls = [], [0]

    def counting(x, sigma):
        calls[0] += 1
        return gaussian_denoiser(x, sigma)

    inv = ddim_invert(counting, x0, ddim_uniform_ascending(10), callback=lambda s, t: seen.append((s, t)))
    ddim_sample(counting, inv.x_T, inv.sampling_sigmas, callback=lambda s, t: seen.append((s, t)))
    ddpm = ddpm_invert(counting, x0, ddim_uniform_descending(10), callback=lambda s, t: seen.append((s, t)))
    ddpm_replay(counting, ddpm, callback=lambda s, t: seen.append((s, t)))
    expected = [(i, 10) for i in range(1, 11)] * 4
    assert seen == expected and calls[0] == len(expected)


def test_inversion_result_helpers():
    x0 = clean_latent()
    ddim = ddim_invert(gaussian_denoiser, x0, ddim_uniform_ascending(10))
    ddpm = ddpm_invert(gaussian_denoiser, x0, ddim_uniform_descending(10), torch.Generator().manual_seed(0))
    for inv in (ddim, ddpm):
        assert inv.num_steps == 10
        assert torch.equal(inv.x_0, x0)
        assert torch.equal(inv.x_T, inv.latent_at(1e9))
        assert torch.equal(inv.latent_at(0.0), x0)
        assert float(inv.sampling_sigmas[0]) == float(inv.sigmas.max())
        assert float(inv.sampling_sigmas[-1]) == 0.0
        k = 4
        assert torch.equal(inv.latent_at(float(inv.sigmas[k]) * 1.001), inv.latents[k])
        moved = inv.to("cpu")
        assert isinstance(moved, Inversion) and torch.equal(moved.latents, inv.latents)
    assert torch.equal(ddim.x_T, ddim.latents[-1]) and torch.equal(ddpm.x_T, ddpm.latents[0])
    with pytest.raises(ValueError, match="noise_maps"):
        Inversion(latents=ddpm.latents, sigmas=ddpm.sigmas, kind="ddpm")


def test_package_does_not_import_comfy():
    source = "\n".join(p.read_text() for p in (ROOT / "inversion").glob("*.py"))
    assert "import comfy" not in source and "from comfy" not in source


def test_null_text_optimisation_pulls_guided_sampling_onto_the_pivot():
    """A toy model whose conditional estimate is `c` and unconditional estimate is the embedding itself:
    the cfg-1 DDIM trajectory (the pivot) is reached at cfg 7.5 only when the embedding approaches `c`."""
    from attention_lab.inversion.null_text import optimise_null_text

    torch.manual_seed(0)
    c = 0.05 * torch.randn(1, 4, 8, 8)
    sigmas = torch.tensor([14.6, 4.0, 1.5, 0.5, 0.0])
    denoise = lambda x, s, e: c.expand_as(x) if e is None else e.expand_as(x)  # noqa: E731
    pivot = [torch.randn(1, 4, 8, 8) * sigmas[0]]
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        pivot.append(c + s_next * (pivot[-1] - c) / s)
    pivot = torch.stack(pivot)

    def guided_end(embeddings):
        x = pivot[0]
        for k, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
            d = embeddings[k] + 7.5 * (c - embeddings[k])
            x = d + s_next * (x - d) / s
        return x

    null = torch.zeros(1, 4, 8, 8)
    embeddings = optimise_null_text(denoise, pivot, sigmas, null, 7.5)
    assert len(embeddings) == 4 and embeddings[0].shape == null.shape and not embeddings[0].requires_grad
    before = (guided_end([null] * 4) - pivot[-1]).abs().mean()
    after = (guided_end(embeddings) - pivot[-1]).abs().mean()
    assert after < 0.1 * before, (before, after)
