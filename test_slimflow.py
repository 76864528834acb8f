"""Tests of slimflow.py: exact values where the math gives them, official sizes, round
trips, bad input, and tiny end-to-end runs. `python -m pytest -q` runs them on a CPU."""

import gzip
import hashlib
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.integrate
import torch
import torch.nn.functional as F

import slimflow as sf

HERE = Path(__file__).parent

# ----------------------------------------------------------------------------- reference facts
# Facts from outside this repository, kept here in compact form so that the suite reads
# nothing beside it. Tensor layouts as `name shape` lines (shape as a Python tuple): the
# official NCSN++ networks' state dicts in their own order (the layout of the published
# checkpoints, and the order of their EMA's shadow_params), and the FID Inception weights
# file pt_inception-2015-12-05-6726825d.pth, sorted; each as (entries, SHA-256 of the lines
# joined by newlines, a few lines spelled out).

OFFICIAL_LAYOUTS = {
    "rf-61.8m": (565, "d27d4370ab43e4e0587274e33ee229f4c12917b5fd5a071d0e2181f88b499650", [
        "sigmas (1000,)", "all_modules.0.weight (512, 128)", "all_modules.1.weight (512, 512)",
        "all_modules.2.weight (128, 3, 3, 3)", "all_modules.3.Conv_0.weight (128, 128, 3, 3)",
        "all_modules.3.Dense_0.weight (128, 512)", "all_modules.7.Conv_2.weight (128, 128, 1, 1)",
        "all_modules.8.Conv_2.weight (256, 128, 1, 1)", "all_modules.9.NIN_0.W (256, 256)",
        "all_modules.29.Conv_2.weight (256, 512, 1, 1)", "all_modules.53.weight (128,)",
        "all_modules.54.weight (3, 128, 3, 3)"]),
    "slim-15.7m": (289, "58ce9f96e5e4608dd5dec9d0c84ea82fd1e4caf8d8a7eb1324c3edffd489877c", [
        "sigmas (1000,)", "all_modules.0.weight (384, 96)", "all_modules.2.weight (96, 3, 3, 3)",
        "all_modules.3.GroupNorm_0.weight (96,)", "all_modules.7.NIN_0.W (192, 192)",
        "all_modules.28.weight (96,)", "all_modules.29.weight (3, 96, 3, 3)"]),
}
FID_LAYOUT = (566, "760681d791cb624e1bf7a2e802a68933dd17aa5e3109fcf498d9dfa521bc10d7", [
    "Conv2d_1a_3x3.conv.weight (32, 3, 3, 3)", "Conv2d_1a_3x3.bn.running_var (32,)",
    "Conv2d_1a_3x3.bn.num_batches_tracked ()", "Mixed_7c.branch_pool.conv.weight (192, 2048, 1, 1)",
    "fc.weight (1008, 2048)", "fc.bias (1008,)"])

def layout_lines(state_dict):
    return [f"{name} {tuple(tensor.shape)}" for name, tensor in state_dict.items()]

def sha256_of_lines(lines):
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# ----------------------------------------------------------------------------- 1. Noise and data

@pytest.mark.parametrize("name", sf.TOY_DATASETS)
def test_toy_data_is_reproducible_and_bounded(name):
    x = sf.toy_data(name, 5000, seed=3)
    assert x.shape == (5000, 2) and torch.equal(x, sf.toy_data(name, 5000, seed=3))
    assert not torch.equal(x, sf.toy_data(name, 5000, seed=4))
    assert x.abs().max() < 6 and x.std() > 0.5


# ----------------------------------------------------------------------------- 2. Networks

def test_unet_maps_images_to_velocities_of_same_shape():
    net = sf.UNet(**sf.PRESETS["unet-micro"], in_ch=1, image_size=16)
    x = torch.randn(2, 1, 16, 16)
    assert net(x, torch.rand(2)).shape == x.shape

def test_unet_starts_at_zero_velocity():
    # zero-initialised output convolution, as in the official code
    net = sf.UNet(**sf.PRESETS["unet-micro"])
    assert net(torch.randn(2, 3, 32, 32), torch.rand(2)).abs().max() == 0

def test_time_embedding_is_sines_then_cosines_of_999t():
    t = torch.tensor([0.0, 0.5])
    emb = sf.time_embedding(t, 8)
    assert torch.allclose(emb[:, 0], torch.sin(999 * t)) and torch.allclose(emb[:, 4], torch.cos(999 * t))
    assert torch.allclose(emb[:, 3], torch.sin(999 * t * 1e-4), atol=1e-6)  # lowest frequency 1/10000

def test_fresh_blocks_compute_exactly_their_rescaled_identity():
    # zero-initialised output convolutions: a new block adds nothing to its input, (x + 0)/√2
    torch.manual_seed(0)
    x, temb = torch.randn(2, 8, 16, 16), torch.randn(2, 32)
    assert torch.equal(sf.ResBlock(8, 8, 32, dropout=0.0)(x, temb), x / math.sqrt(2))
    assert torch.equal(sf.Attention(8)(x), x / math.sqrt(2))
    for resample, resized in [("down", F.avg_pool2d(x, 2)), ("up", F.interpolate(x, scale_factor=2.0))]:
        block = sf.ResBlock(8, 16, 32, dropout=0.0, resample=resample)  # the skip path: resample, then 1x1 conv
        skip = F.conv2d(resized, block.shortcut.weight, block.shortcut.bias)
        torch.testing.assert_close(block(x, temb), skip / math.sqrt(2), rtol=0, atol=1e-6)

class AffineField(torch.nn.Module):
    """v(x, t) = b + c·t + k·x in float64, with b a parameter (so gradients can be read)."""

    def __init__(self, b, c=0.0, k=0.0):
        super().__init__()
        self.b, self.c, self.k = torch.nn.Parameter(torch.tensor(b, dtype=torch.float64)), c, k

    def forward(self, x, t):
        return self.b + self.c * t[:, None].double() + self.k * x

def test_the_generator_is_z_plus_u_at_time_eps():
    z = torch.randn(5, 2, dtype=torch.float64)
    u = AffineField([0.0, 0.0], c=1000.0)  # u(z, t) = 1000·t: 1 at t = eps, 0 at 0, 1000 at 1
    torch.testing.assert_close(sf.OneStepGenerator(u)(z), z + 1000 * sf.EPS, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- 3. Rectified flow and its samplers
# dZ/dt = c (constant) and dZ/dt = a·Z have closed forms for every fixed-step method;
# dZ/dt = -Z³ is non-linear with Z(1) = Z(eps) / sqrt(1 + 2·Z(eps)²·(1 - eps)).

def constant_field(c):
    return lambda x, t: torch.full_like(x, c)

def linear_field(a):
    return lambda x, t: a * x

@pytest.mark.parametrize("n", [1, 3, 10])
def test_euler_is_exact_on_a_constant_field(n):
    z = torch.randn(5, 2, dtype=torch.float64)
    x, nfe = sf.euler_sample(constant_field(0.7), z, n)
    assert nfe == n
    assert torch.allclose(x, z + 0.7 * (1 - sf.EPS), atol=1e-12, rtol=0)

def test_one_step_is_one_euler_step():
    z = torch.randn(5, 2, dtype=torch.float64)
    x, nfe = sf.one_step_sample(linear_field(-0.5), z)
    assert nfe == 1 and torch.allclose(x, z * (1 - 0.5 * (1 - sf.EPS)), atol=1e-12, rtol=0)

@pytest.mark.parametrize("n", [1, 2, 5])
def test_euler_and_heun_match_their_closed_forms_on_a_linear_field(n):
    a, z, h = -0.8, torch.randn(4, 3, dtype=torch.float64), (1 - sf.EPS) / n
    x, nfe = sf.euler_sample(linear_field(a), z, n)
    assert nfe == n and torch.allclose(x, z * (1 + a * h) ** n, atol=1e-12, rtol=0)
    x, nfe = sf.heun_sample(linear_field(a), z, n)  # trapezoidal steps, the last one Euler
    expected = z * (1 + a * h + (a * h) ** 2 / 2) ** (n - 1) * (1 + a * h)
    assert nfe == 2 * n - 1 and torch.allclose(x, expected, atol=1e-12, rtol=0)

def test_rk45_solves_a_nonlinear_ode_within_its_tolerance():
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)[:, None]
    exact = z / torch.sqrt(1 + 2 * z**2 * (1 - sf.EPS))
    x, nfe, path = sf.rk45_sample(lambda x, t: -x**3, z, rtol=1e-6, atol=1e-6, trajectory=True)
    assert (x - exact).abs().max() < 1e-5
    assert nfe > 6 and torch.equal(path[0], z) and torch.equal(path[-1], x)
    x_loose, nfe_loose = sf.rk45_sample(lambda x, t: -x**3, z, rtol=1e-3, atol=1e-3)
    assert nfe_loose < nfe and (x_loose - exact).abs().max() < 1e-2

def test_rk45_stops_at_a_velocity_that_is_not_finite():  # scipy alone would shrink its step forever
    diverged = lambda x, t: torch.where(t[:, None] > 0.5, float("nan"), x)  # noqa: E731
    with pytest.raises(sf.TrainingError, match=r"not finite at t = 0\.[5-9]"):
        sf.rk45_sample(diverged, torch.randn(4, 2))

def test_trajectories_run_from_noise_to_sample():
    z = torch.randn(6, 2)
    for sample, steps in [(lambda v, z: sf.euler_sample(v, z, 4, trajectory=True), 5),
                          (lambda v, z: sf.heun_sample(v, z, 3, trajectory=True), 4)]:
        x, _, path = sample(linear_field(0.3), z)
        assert path.shape == (steps, 6, 2) and torch.equal(path[0], z) and torch.equal(path[-1], x)

def test_samplers_pass_time_of_shape_batch():
    seen = []
    sf.rk45_sample(lambda x, t: seen.append(t.shape) or x * 0, torch.zeros(3, 2))
    sf.heun_sample(lambda x, t: seen.append(t.shape) or x * 0, torch.zeros(3, 2), 2)
    assert set(seen) == {(3,)}

# Fields that depend on time, so that a sampler that reads v at the wrong time, or starts
# at 0 instead of eps, lands elsewhere. The grid is t_i = eps + i·h, h = (1 - eps)/n.
#   dZ/dt = t      exact Z(1) = Z(eps) + (1 - eps²)/2; Euler adds h·Σ t_i; a Heun step
#                  (t_i + t_i+1)/2·h is exact, the last (Euler) step adds h·t_n-1
#   dZ/dt = t·Z    exact Z(1) = Z(eps)·exp((1 - eps²)/2); Euler multiplies by Π (1 + h·t_i);
#                  a Heun step by 1 + h/2·(t_i + t_i+1·(1 + h·t_i))

def time_field(x, t):
    return t[:, None].to(x.dtype).expand_as(x)

def time_times_z_field(x, t):
    return t[:, None].to(x.dtype) * x

def grid(n):
    h = (1 - sf.EPS) / n
    return h, [sf.EPS + i * h for i in range(n)]

@pytest.mark.parametrize("n", [1, 2, 5])
def test_euler_and_heun_on_fields_that_depend_on_time(n):
    z = torch.randn(4, 3, dtype=torch.float64)
    h, ts = grid(n)
    x, _ = sf.euler_sample(time_field, z, n)
    torch.testing.assert_close(x, z + h * sum(ts), rtol=0, atol=1e-12)
    x, _ = sf.euler_sample(time_times_z_field, z, n)
    torch.testing.assert_close(x, z * math.prod(1 + h * t for t in ts), rtol=0, atol=1e-12)
    x, _ = sf.heun_sample(time_field, z, n)
    torch.testing.assert_close(x, z + sum(h * (t + h / 2) for t in ts[:-1]) + h * ts[-1], rtol=0, atol=1e-12)
    x, _ = sf.heun_sample(time_times_z_field, z, n)
    factor = math.prod(1 + h / 2 * (t + (t + h) * (1 + h * t)) for t in ts[:-1]) * (1 + h * ts[-1])
    torch.testing.assert_close(x, z * factor, rtol=0, atol=1e-12)

@pytest.mark.parametrize("nfe, steps", [(1, 1), (3, 2), (4, 2), (5, 3)])
def test_heun_spends_an_nfe_budget_of_2n_minus_1(nfe, steps):
    z = torch.zeros(2, 1, dtype=torch.float64)
    h, ts = grid(steps)
    x, used = sf.sample_with(time_field, z, "heun", nfe)
    assert used == 2 * steps - 1
    torch.testing.assert_close(x, z + sum(h * (t + h / 2) for t in ts[:-1]) + h * ts[-1], rtol=0, atol=1e-12)

def test_two_euler_steps_of_dz_dt_equal_t_by_hand():
    # h = 0.4995, t = 0.001 and 0.5005: Z + 0.4995·0.5015 = Z + 0.25049925 (exact: Z + 0.4999995)
    x, nfe = sf.euler_sample(time_field, torch.zeros(1, 1, dtype=torch.float64), 2)
    assert nfe == 2 and x.item() == pytest.approx(0.25049925, abs=1e-15)

def test_one_step_reads_the_field_at_eps():
    z = torch.randn(6, 2, dtype=torch.float64)
    x, nfe = sf.one_step_sample(lambda x, t: time_times_z_field(x, t) + time_field(x, t), z)
    assert nfe == 1
    torch.testing.assert_close(x, z + (1 - sf.EPS) * sf.EPS * (z + 1), rtol=0, atol=1e-14)

def test_rk45_integrates_from_eps_to_one():
    z = torch.randn(5, 2, dtype=torch.float64)
    x, _ = sf.rk45_sample(time_field, z)  # RK45 is exact on a field linear in t
    torch.testing.assert_close(x, z + (1 - sf.EPS**2) / 2, rtol=0, atol=1e-10)
    x, _ = sf.rk45_sample(time_times_z_field, z, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(x, z * math.exp((1 - sf.EPS**2) / 2), rtol=0, atol=1e-6)

def test_training_times_are_uniform_on_eps_to_one():
    t = sf.sample_time(torch.empty(10**6, dtype=torch.float64))
    assert sf.EPS <= t.min() < sf.EPS + 1e-4 and 1 - 1e-4 < t.max() <= 1
    assert t.mean().item() == pytest.approx((1 + sf.EPS) / 2, abs=2e-3)

def test_rk45_returns_its_end_point_without_the_trajectory():
    x, _ = sf.rk45_sample(lambda x, t: -x, torch.randn(4, 2))
    assert x.untyped_storage().nbytes() == x.nbytes  # what a shard saves: the end, not the whole path


# ----------------------------------------------------------------------------- 4. The objectives

def test_flow_loss_is_zero_for_the_exact_velocity_of_a_point_mass():
    # data = m: X_t = t·m + (1 - t)·X0, so (m - X_t)/(1 - t) = m - X0 exactly
    m = torch.tensor([1.5, -2.0], dtype=torch.float64)
    x1 = m.expand(256, 2)
    loss, _ = sf.RectifiedFlowLoss()(lambda x, t: (m - x) / (1 - t[:, None]), x1, 0)
    assert loss.item() < 1e-20

@pytest.mark.parametrize("schedule, at_half, at_end, at_twice", [
    ("linear", 0.5, 0.0, 0.0),
    ("cosine", 0.5, 0.0, 0.0),
    ("exponential", math.exp(-0.5), math.exp(-1.0), math.exp(-2.0)),
])
def test_annealing_beta_at_its_endpoints(schedule, at_half, at_end, at_twice):
    K = 1000
    assert sf.annealing_beta(0, K, schedule) == 1.0
    assert sf.annealing_beta(K // 2, K, schedule) == pytest.approx(at_half, abs=1e-12)
    assert sf.annealing_beta(K, K, schedule) == pytest.approx(at_end, abs=1e-12)
    assert sf.annealing_beta(2 * K, K, schedule) == pytest.approx(at_twice, abs=1e-12)
    assert sf.annealing_beta(0, 0, schedule) == 0.0  # K = 0: plain reflow

def test_cosine_beta_is_monotone():
    betas = [sf.annealing_beta(k, 100, "cosine") for k in range(0, 120, 5)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))

@pytest.mark.parametrize("schedule, beta", [("linear", 0.75), ("cosine", (1 + math.cos(math.pi / 4)) / 2),
                                            ("exponential", math.exp(-0.25))])
def test_annealing_reflow_blends_the_noise_by_beta_of_the_step(schedule, beta):
    # Z0 = Z1 = 0 and v = 0: all that is left to regress is the blended noise β·ε, so the
    # loss is E(β·ε)² = β(k)², here at k = K/4
    zeros = torch.zeros(200_000, 2, dtype=torch.float64)
    loss, logs = sf.AnnealingReflowLoss(1000, schedule)(lambda x, t: torch.zeros_like(x), (zeros, zeros), 250)
    assert logs["beta"] == pytest.approx(beta, abs=1e-12)
    assert loss.item() == pytest.approx(beta**2, rel=0.02)

def test_annealing_reflow_regresses_onto_the_blended_noise():
    # v(x, t) = (Z1 - x)/(1 - t) is the exact velocity toward Z1 from wherever X_t lies, so the
    # loss vanishes only if X_t and the target X1 - X0^β use the same blended X0^β
    torch.manual_seed(0)
    z0, z1 = torch.randn(256, 2, dtype=torch.float64), torch.randn(256, 2, dtype=torch.float64) + 2
    toward_z1 = lambda x, t: (z1 - x) / (1 - t[:, None])  # noqa: E731
    for step in (0, 300, 1000):
        assert sf.AnnealingReflowLoss(1000)(toward_z1, (z0, z1), step)[0].item() < 1e-12

@pytest.mark.parametrize("beta", [0.0, 0.3, 0.8, 1.0])
def test_noise_mix_keeps_unit_variance(beta):
    torch.manual_seed(0)
    z0 = torch.randn(400_000)
    x0 = sf.mix_noise(z0, beta)
    assert x0.var().item() == pytest.approx(1.0, abs=0.01)
    assert (x0 * z0).mean().item() == pytest.approx(math.sqrt(1 - beta**2), abs=0.01)  # keeps the coupling

def test_reflow_loss_is_zero_for_a_perfect_student_once_beta_is_zero():
    c = torch.tensor([0.5, -1.0], dtype=torch.float64)
    z0 = torch.randn(128, 2, dtype=torch.float64)
    loss_fn = sf.AnnealingReflowLoss(K=10)
    perfect = lambda x, t: c.expand_as(x)  # noqa: E731 -- the straight coupling Z1 = Z0 + c
    assert loss_fn(perfect, (z0, z0 + c), 10)[0].item() < 1e-20
    assert loss_fn(perfect, (z0, z0 + c), 0)[0].item() > 0.1  # β = 1: independent noise, not the pair

@pytest.mark.parametrize("form", ["paper", "official"])
@pytest.mark.parametrize("distance", ["l2", "huber"])
def test_distillation_loss_is_zero_for_a_perfect_generator(form, distance):
    c = torch.tensor([0.5, -1.0], dtype=torch.float64)
    u = lambda x, t: c.expand_as(x)  # noqa: E731
    guide = sf.MLP()  # replaced by the straight field below
    loss_fn = sf.FlowGuidedDistillationLoss(guide, sf.DISTANCES[distance], 1.0, form)
    loss_fn.v2 = u
    z0 = torch.randn(64, 2, dtype=torch.float64)
    generator = lambda z: z + u(z, None)  # noqa: E731
    loss, logs = loss_fn(generator, (z0, z0 + c), 0)
    assert loss.item() < 1e-12 and set(logs) == {"pair", "reg"}

def uniform_mean(f, lo, hi):
    """E f(s) for s ~ U(lo, hi), by quadrature."""
    return scipy.integrate.quad(f, lo, hi)[0] / (hi - lo)

# Flow-Guided Distillation with a student u and a guide v2 that differ and read their inputs:
#   u(z, t) = a + 100·t, so G(z) = z + u0 with u0 = a + 0.1;   v2(x, t) = b + c·t + k·x.
# Pairs Z1 = Z0 + c1 give D(G(Z0), Z1) = mean (u0 - c1)². On fresh z ~ N(0, I), G(z) - target
# is A(t') + B(t')·z, so the L2 regularizer is E_t'[A² + B²] (per coordinate, averaged):
#   official  x' = z + t'·u0:       A = (1 - t')(u0 - b - c·t' - k·t'·u0),  B = -(1 - t')·k
#   paper     x' = z + t'·v2(z, eps): A = u0 - t'(b + c·eps)(1 + (1 - t')k) - (1 - t')(b + c·t'),
#                                     B = 1 - (1 + t'·k)(1 + (1 - t')·k)
# The target is under stop-gradient, so the gradient in a is that of D through G alone:
# 2/d·(mean(u0 - c1) + λ·E[A]) per coordinate, d = 2.
A_, B_, C_, K_, C1 = [0.3, -0.5], [1.0, 0.4], 2.0, 0.5, [0.7, -0.2]

def distillation_terms(form):
    u0 = [a + 100 * sf.EPS for a in A_]

    def AB(j, t):
        if form == "official":
            return (1 - t) * (u0[j] - B_[j] - C_ * t - K_ * t * u0[j]), -(1 - t) * K_
        return (u0[j] - t * (B_[j] + C_ * sf.EPS) * (1 + (1 - t) * K_) - (1 - t) * (B_[j] + C_ * t),
                1 - (1 + t * K_) * (1 + (1 - t) * K_))
    reg = np.mean([uniform_mean(lambda t: AB(j, t)[0] ** 2 + AB(j, t)[1] ** 2, 0.2, 0.8) for j in range(2)])
    mean_A = [uniform_mean(lambda t: AB(j, t)[0], 0.2, 0.8) for j in range(2)]
    pair = np.mean([(u0[j] - C1[j]) ** 2 for j in range(2)])
    return pair, reg, mean_A, [u0[j] - C1[j] for j in range(2)]

@pytest.mark.parametrize("form", ["official", "paper"])
def test_flow_guided_distillation_by_its_closed_form(form):
    torch.manual_seed(0)
    u, guide = AffineField(A_, c=100.0), AffineField(B_, c=C_, k=K_)
    loss_fn = sf.FlowGuidedDistillationLoss(guide, sf.l2_distance, 0.5, form)
    guide.requires_grad_(True)  # whatever the flag says, no gradient may reach the guide
    z0 = torch.randn(200_000, 2, dtype=torch.float64)
    loss, logs = loss_fn(sf.OneStepGenerator(u), (z0, z0 + torch.tensor(C1, dtype=torch.float64)), 0)
    pair, reg, mean_A, pair_gap = distillation_terms(form)
    assert logs["pair"].item() == pytest.approx(pair, rel=1e-6)
    assert logs["reg"].item() == pytest.approx(reg, rel=0.02)
    assert loss.item() == pytest.approx(logs["pair"].item() + 0.5 * logs["reg"].item(), rel=1e-12)
    loss.backward()
    assert guide.b.grad is None
    expected_grad = [(pair_gap[j] + 0.5 * mean_A[j]) for j in range(2)]  # times 2/d = 1
    torch.testing.assert_close(u.b.grad, torch.tensor(expected_grad, dtype=torch.float64), rtol=0.02, atol=2e-3)

def test_the_two_regularization_targets_differ_here():  # so that the test above tells them apart
    (_, official, *_), (_, paper, *_) = distillation_terms("official"), distillation_terms("paper")
    assert abs(official - paper) > 0.2 * max(official, paper)

def test_distillation_sends_no_gradient_into_the_frozen_flow():
    torch.manual_seed(0)
    guide = sf.MLP(hidden=16, depth=2)
    generator = sf.OneStepGenerator(sf.MLP(hidden=16, depth=2))
    z0 = torch.randn(32, 2)
    loss, _ = sf.FlowGuidedDistillationLoss(guide, sf.l2_distance, 1.0, "paper")(generator, (z0, z0 + 1), 0)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in guide.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())

def test_naive_distillation_skips_the_regularizer():
    torch.manual_seed(0)
    calls = []
    guide = lambda x, t: calls.append(1) or x  # noqa: E731
    loss_fn = sf.FlowGuidedDistillationLoss(sf.MLP(hidden=4, depth=1), sf.l2_distance, 0.0)
    loss_fn.v2 = guide
    z0 = torch.randn(8, 2)
    _, logs = loss_fn(lambda z: z, (z0, z0 + 1), 0)
    assert calls == [] and set(logs) == {"pair"}

def test_pseudo_huber_is_zero_at_equality_and_linear_far_away():
    a = torch.zeros(3, 4)
    assert sf.pseudo_huber_distance(a, a).abs().max() < 1e-12
    b = torch.full((3, 4), 10.0)  # ‖a - b‖ = 20
    assert torch.allclose(sf.pseudo_huber_distance(a, b), torch.full((3,), 20.0), atol=2e-3)


# ----------------------------------------------------------------------------- 5. TraFlow: trajectory distillation

def test_traflow_map_is_the_identity_at_equal_times():
    model = sf.MLP(hidden=16, depth=2, two_times=True)
    x, t = torch.randn(8, 2), torch.rand(8)
    assert torch.equal(sf.traflow_map(model, x, t, t), x)

def test_traflow_velocity_by_jvp_matches_a_finite_difference():
    torch.manual_seed(0)
    model = sf.MLP(hidden=32, depth=2, two_times=True).double()
    x, t = torch.randn(6, 2, dtype=torch.float64), torch.full((6,), 0.3, dtype=torch.float64)
    s, h = torch.full((6,), 0.6, dtype=torch.float64), 1e-5
    _, dg_ds = torch.func.jvp(lambda s_: sf.traflow_map(model, x, t, s_), (s,), (torch.ones_like(s),))
    finite = (sf.traflow_map(model, x, t, s + h) - sf.traflow_map(model, x, t, s - h)) / (2 * h)
    assert (dg_ds - finite).abs().max() < 1e-3 and dg_ds.abs().max() > 1e-2

@pytest.mark.parametrize("phases, step", [(0, 0), (10, 0), (10, 10)])
@pytest.mark.parametrize("midpoint", ["student", "teacher"])
def test_traflow_losses_are_zero_for_a_student_of_an_exactly_straight_teacher(phases, step, midpoint):
    c = torch.tensor([0.5, -1.0], dtype=torch.float64)
    straight = lambda x, t, s=None: c.expand_as(x)  # noqa: E731 -- v = G = c: every path is a line
    loss_fn = sf.TraFlowLoss(sf.MLP(hidden=4, depth=1), phase_steps=phases, midpoint=midpoint)
    loss_fn.teacher = straight
    z0 = torch.randn(64, 2, dtype=torch.float64)
    loss, logs = loss_fn(straight, (z0, z0 + (1 - sf.EPS) * c), step)
    assert logs and all(v < 1e-12 for v in logs.values()) and loss.item() < 1e-12
    expected = {"out", "vel", "cons"} if phases == 0 else {"cons"} if step < phases else {"out", "vel"}
    assert set(logs) == expected

class TwoTimeField(torch.nn.Module):
    """G(x, t, s) = alpha + kappa·s in float64, alpha a parameter: g(x, t, s) = x + (s - t)·G."""

    def __init__(self, alpha, kappa):
        super().__init__()
        self.alpha, self.kappa = torch.nn.Parameter(torch.tensor(alpha, dtype=torch.float64)), kappa

    def forward(self, x, t, s):
        return self.alpha + self.kappa * s[:, None] + 0 * x

def traflow_mean(f):
    """E f(t, u) for t ~ U(eps, 1) and u = t + (1 - t)·r, r ~ U(0, 1), by quadrature."""
    return scipy.integrate.dblquad(lambda r, t: f(t, t + (1 - t) * r), sf.EPS, 1, 0, 1)[0] / (1 - sf.EPS)

# TraFlow with a student G = alpha + kappa·s, a teacher v(x, t) = beta + mu·x and an EMA copy
# G' = gamma + kappa'·s, all different, on pairs Z0 = Z1 = 0 (so x_t = 0). Per coordinate:
#   output       g(0, eps, 1) = (1 - eps)(alpha + kappa): RMSE over coordinates, mean over pairs
#   velocity     ∂g/∂s = alpha + kappa(2s - t) against v(g, s) = beta + mu(s - t)(alpha + kappa·s)
#                (plus nu·s where the teacher also reads time: v = beta + nu·t + mu·x)
#   consistency  g(x_t, t, 1) - g*(x_u, u, 1), with x_u = g(x_t, t, u) (student) or
#                x_t + (u - t)·v(x_t, t) (teacher), and g* the student under stop-gradient or G'
ALPHA, KAPPA, BETA, MU, GAMMA, KAPPA_EMA = [0.6, -0.3], 0.8, [-0.4, 0.9], 0.7, [0.2, 0.5], -0.6

def consistency_gap(midpoint, target, j, t, u):
    x_u = (u - t) * (ALPHA[j] + KAPPA * u) if midpoint == "student" else (u - t) * BETA[j]
    g_target = (ALPHA[j] + KAPPA) if target == "stopgrad" else (GAMMA[j] + KAPPA_EMA)
    return (1 - t) * (ALPHA[j] + KAPPA) - x_u - (1 - u) * g_target

@pytest.mark.parametrize("midpoint, target", [("teacher", "stopgrad"), ("student", "stopgrad"),
                                              ("student", "ema"), ("teacher", "ema")])
def test_traflow_consistency_by_its_closed_form(midpoint, target):
    torch.manual_seed(0)
    student = TwoTimeField(ALPHA, KAPPA)
    ema = TwoTimeField(GAMMA, KAPPA_EMA) if target == "ema" else None  # train() keeps the student's EMA in it
    loss_fn = sf.TraFlowLoss(AffineField(BETA, k=MU), phase_steps=1, midpoint=midpoint, ema=ema)
    zeros = torch.zeros(200_000, 2, dtype=torch.float64)
    loss, logs = loss_fn(student, (zeros, zeros), 0)  # step 0 < phase_steps: consistency alone
    expected = np.mean([traflow_mean(lambda t, u: consistency_gap(midpoint, target, j, t, u) ** 2) for j in range(2)])
    assert set(logs) == {"cons"} and loss.item() == pytest.approx(expected, rel=0.03)
    loss.backward()  # the target is under stop-gradient: only g(x_t, t, 1) = x_t + (1 - t)·G carries one
    grad = [traflow_mean(lambda t, u: consistency_gap(midpoint, target, j, t, u) * (1 - t)) for j in range(2)]
    torch.testing.assert_close(student.alpha.grad, torch.tensor(grad, dtype=torch.float64), rtol=0.03, atol=2e-3)

def test_traflow_output_and_velocity_by_their_closed_form():
    torch.manual_seed(0)
    nu = -1.5  # the teacher v(x, t) = beta + nu·t + mu·x is read at the jump's end s
    loss_fn = sf.TraFlowLoss(AffineField(BETA, c=nu, k=MU), phase_steps=1)
    zeros = torch.zeros(200_000, 2, dtype=torch.float64)
    loss, logs = loss_fn(TwoTimeField(ALPHA, KAPPA), (zeros, zeros), 1)  # step 1: output and velocity
    out = math.sqrt(np.mean([((1 - sf.EPS) * (a + KAPPA)) ** 2 for a in ALPHA]))
    vel = np.mean([traflow_mean(lambda t, s: (ALPHA[j] + KAPPA * (2 * s - t) - BETA[j] - nu * s
                                              - MU * (s - t) * (ALPHA[j] + KAPPA * s)) ** 2) for j in range(2)])
    assert set(logs) == {"out", "vel"}
    assert logs["out"].item() == pytest.approx(out, rel=1e-9)
    assert logs["vel"].item() == pytest.approx(vel, rel=0.03)

def test_traflow_sampling_walks_the_uniform_grid():
    # G(x, t, s) = x·s: each jump multiplies by 1 + (s - t)·s, so the grid and the order of
    # (t, s) show in the product
    z = torch.randn(4, 2, dtype=torch.float64)
    for steps in (1, 2, 3):
        times = [sf.EPS + (1 - sf.EPS) * i / steps for i in range(steps + 1)]
        x, nfe = sf.traflow_sample(lambda x, t, s: x * s[:, None], z, steps)
        factor = math.prod(1 + (s - t) * s for t, s in zip(times[:-1], times[1:]))
        assert nfe == steps
        torch.testing.assert_close(x, z * factor, rtol=0, atol=1e-12)

def test_traflow_output_term_is_a_mean_over_pairs():  # so that N processes take the global batch's step
    torch.manual_seed(0)
    loss_fn = sf.TraFlowLoss(sf.build_model("mlp-32x2", (2,)), phase_steps=1)
    student = sf.build_model("mlp-32x2", (2,), two_times=True)
    z0, z1 = torch.randn(8, 2), 3 * torch.randn(8, 2)
    whole = loss_fn(student, (z0, z1), 1)[1]["out"].item()
    halves = [loss_fn(student, (z0[i:i + 4], z1[i:i + 4]), 1)[1]["out"].item() for i in (0, 4)]
    assert whole == pytest.approx(sum(halves) / 2, rel=1e-6)
    per_pair = (student(z0, torch.full((8,), sf.EPS), torch.ones(8)) * (1 - sf.EPS) + z0 - z1).square().mean(1).sqrt()
    assert whole == pytest.approx(per_pair.mean().item(), rel=1e-6)

def test_traflow_velocity_term_runs_in_float32_under_bf16_autocast():
    # ∂g/∂s is taken in float32 whatever the autocast (forward-mode AD and bf16 autocast do not mix): under bf16
    # the velocity term equals float32's to round-off, while the output term, which runs in bf16, shows bf16's error
    teacher, student = randomised_unet(), randomised_unet(two_times=True, seed=1)
    with torch.no_grad():  # a guide as fast as the student's ∂g/∂s (about 30), so that its rounding would show
        teacher.out_conv.weight.mul_(50), teacher.out_conv.bias.mul_(50)
    z0 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logs = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(2)  # the same times t and s
        with sf.bf16_autocast("cpu", precision):
            loss, logs[precision] = sf.TraFlowLoss(teacher, phase_steps=1)(student, (z0, 0.5 * z0 + 0.3), 1)
        loss.backward()
    fp32, bf16 = ({k: v.item() for k, v in logs[p].items()} for p in ("fp32", "bf16"))
    assert fp32["vel"] > 1e-3 and bf16["vel"] == pytest.approx(fp32["vel"], rel=1e-5)
    assert bf16["out"] != pytest.approx(fp32["out"], rel=1e-5) and bf16["out"] == pytest.approx(fp32["out"], rel=0.05)

def forward_ad_through_channels_last_group_norm():
    """Whether this PyTorch takes forward-mode derivatives through GroupNorm of a channels_last convolution's output
    plus a time embedding (2.11 does not: 'view size is not compatible with input tensor's size and stride')."""
    conv = torch.nn.Conv2d(4, 4, 3, padding=1).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 4, 4).contiguous(memory_format=torch.channels_last)
    try:
        torch.func.jvp(lambda s: F.group_norm(conv(x) + s[:, None, None, None], 2), (torch.rand(2),), (torch.ones(2),))
    except RuntimeError:
        return False
    return True

@pytest.mark.skipif(not forward_ad_through_channels_last_group_norm(),
                    reason="this PyTorch has no forward-mode AD through GroupNorm in channels_last (slimflow refuses "
                           "traflow with --channels-last)")
def test_traflow_velocity_runs_through_channels_last_attention():
    # channels_last makes SDPA pick a fused kernel, which has no forward-mode AD
    torch.manual_seed(0)
    model = sf.UNet(**sf.PRESETS["unet-micro"], two_times=True).to(memory_format=torch.channels_last)
    z0 = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss, logs = sf.TraFlowLoss(sf.UNet(**sf.PRESETS["unet-micro"]))(model, (z0, z0 + 1), 0)
    loss.backward()
    assert set(logs) == {"out", "vel", "cons"} and torch.isfinite(loss)


# ----------------------------------------------------------------------------- 6. Measuring

def test_sliced_wasserstein_in_one_dimension_is_the_shift():
    a = torch.randn(1000, 1)
    assert sf.sliced_wasserstein(a, a) == 0.0
    assert sf.sliced_wasserstein(a, a + 0.25) == pytest.approx(0.25, abs=1e-9)
    assert sf.sliced_wasserstein(a, a.flip(0)) == 0.0  # order does not matter

def test_sliced_wasserstein_rejects_sets_of_different_size():
    with pytest.raises(ValueError, match="equal-size"):
        sf.sliced_wasserstein(torch.randn(10, 2), torch.randn(11, 2))

def test_straightness_is_zero_for_straight_paths_and_positive_for_curved_ones():
    z = torch.randn(64, 2, dtype=torch.float64)
    assert sf.straightness(constant_field(1.3), z) < 1e-20
    assert sf.straightness(lambda x, t: x * 0 + torch.tensor([1.0, -2.0], dtype=x.dtype), z) < 1e-20
    rotation = lambda x, t: torch.stack([-x[:, 1], x[:, 0]], 1)  # noqa: E731 -- paths are circle arcs
    assert sf.straightness(rotation, z) > 0.1
    # x' = a·x from Z0 = (1, 1): Z(t) = Z0·e^(a(t - eps)), S = ‖Z0‖²/T·∫ (chord - a·e^(a(t-eps)))² dt
    a, T = 1.0, 1 - sf.EPS
    chord = (math.exp(a * T) - 1) / T
    exact = 2 * (chord**2 - 2 * chord * (math.exp(a * T) - 1) / T + a * (math.exp(2 * a * T) - 1) / (2 * T))
    assert sf.straightness(linear_field(a), torch.ones(4, 2, dtype=torch.float64), steps=1000) == \
        pytest.approx(exact, rel=0.01)

def test_straightness_of_dz_dt_equal_t_is_the_spread_of_the_euler_times():
    # the Euler path of dZ/dt = t moves at t_i on step i; its chord moves at their mean, so
    # S = d·Var(t_i) = d·h²·(n² - 1)/12
    n, z = 100, torch.randn(8, 2, dtype=torch.float64)
    h = (1 - sf.EPS) / n
    assert sf.straightness(time_field, z, steps=n) == pytest.approx(2 * h**2 * (n**2 - 1) / 12, rel=1e-9)

def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    m1, m2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # ‖m1 - m2‖² + Σ(√a - √b)² = (1 + 0 + 6.25) + (4 + 1 + 0) = 12.25
    assert sf.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(12.25, rel=1e-10)

def test_frechet_distance_of_non_diagonal_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))  # shared eigenvectors: the covariances commute
    a, b = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
    m1, m2 = rng.standard_normal(5), rng.standard_normal(5)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert sf.frechet_distance(m1, q @ np.diag(a) @ q.T, m2, q @ np.diag(b) @ q.T) == pytest.approx(expected, rel=1e-8)
    x = rng.standard_normal((8, 8))
    s = x @ x.T + 0.1 * np.eye(8)  # S2 = c²·S1: Tr(S1)·(1 - c)²
    assert sf.frechet_distance(np.zeros(8), s, np.zeros(8), 0.09 * s) == pytest.approx(np.trace(s) * 0.49, rel=1e-8)

def test_frechet_distance_is_zero_for_identical_statistics_and_symmetric():
    rng = np.random.default_rng(2)
    mu1, s1 = sf.gaussian_stats(rng.standard_normal((200, 6)))
    mu2, s2 = sf.gaussian_stats(2 * rng.standard_normal((200, 6)) + 1)
    assert abs(sf.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    assert sf.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(sf.frechet_distance(mu2, s2, mu1, s1), rel=1e-8)
    mu, s = sf.gaussian_stats(rng.standard_normal((5, 20)))  # singular: fewer samples than dimensions
    assert abs(sf.frechet_distance(mu, s, mu, s)) < 1e-4

def test_frechet_distance_refuses_a_complex_square_root():
    with pytest.raises(ValueError, match="imaginary"):
        sf.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]))

# ----------------------------------------------------------------------------- 7. The training loop

TOY_TRAINING = dict(steps=20, batch_size=64, lr=1e-3, lr_warmup=100, grad_clip=1.0, ema_decay=0.999, log_every=10,
                    ckpt_every=10)  # TINY's, and the toy defaults

def train_toy_teacher(out, objective, data, device="cpu", **options):
    """sf.train on a fresh mlp-64x2 teacher into <out>/teacher.pt, with TINY's settings or `options`."""
    meta = dict(stage="teacher", dataset="8gaussians", model_name="mlp-64x2", data_shape=[2])
    return sf.train(sf.build_model("mlp-64x2", (2,)).to(device), objective, data, device=device,
                    checkpoint=Path(out) / "teacher.pt", meta=meta, **{**TOY_TRAINING, **options})

def test_checkpoint_round_trip_gives_the_same_network(tmp_path):
    torch.manual_seed(0)
    ema = train_toy_teacher(tmp_path, sf.RectifiedFlowLoss(), sf.TrainingData(torch.randn(100, 2)))
    loaded = sf.load_checkpoint(tmp_path / "teacher.pt", sf.build_model("mlp-64x2", (2,)))
    x, t = torch.randn(7, 2), torch.rand(7)
    assert torch.equal(loaded(x, t), ema(x, t))

class Weights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

def adam_reference(w, gradients, lrs, clip):
    """Adam (β = 0.9, 0.999, eps 1e-8, no weight decay) with gradients clipped to norm `clip`,
    from its equations, in float64: the weights after each step."""
    w, m, v, out = np.array(w), 0.0, 0.0, []
    for k, (g, lr) in enumerate(zip(gradients, lrs), 1):
        g = np.array(g) * min(1.0, clip / (np.linalg.norm(g) + 1e-6))
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g**2
        w = w - lr * (m / (1 - 0.9**k)) / (np.sqrt(v / (1 - 0.999**k)) + 1e-8)
        out.append(w)
    return out

@pytest.mark.parametrize("ema_decay", [0.2, 0.999])
def test_two_training_steps_by_value(tmp_path, ema_decay):
    # loss = w·g_k at step k, so the gradient is g_k: (3, 4) is clipped to norm 1, (0.3, -0.4)
    # is not. lr 0.1 warms up over 4 steps (0.025, 0.05); the EMA decays by
    # min(ema_decay, (1 + n)/(10 + n)) at update n: 2/11, then 0.2 or 3/12
    gradients = [[3.0, 4.0], [0.3, -0.4]]
    objective = lambda net, batch, step: ((net.w * torch.tensor(gradients[step])).sum(), {})  # noqa: E731
    meta = dict(stage="teacher", dataset="8gaussians", model_name="weights", data_shape=[2])
    sf.train(Weights(), objective, sf.TrainingData(torch.zeros(4, 2)), steps=2, batch_size=4, lr=0.1, lr_warmup=4,
             grad_clip=1.0, ema_decay=ema_decay, checkpoint=tmp_path / "teacher.pt", meta=meta)
    w1, w2 = adam_reference([1.0, -2.0], gradients, [0.025, 0.05], clip=1.0)
    d1, d2 = min(ema_decay, 2 / 11), min(ema_decay, 3 / 12)
    ema = d2 * (d1 * np.array([1.0, -2.0]) + (1 - d1) * w1) + (1 - d2) * w2
    ckpt = sf.read_checkpoint(tmp_path / "teacher.pt")
    assert ckpt["step"] == 2
    np.testing.assert_allclose(ckpt["model"]["w"].numpy(), w2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ckpt["ema"]["w"].numpy(), ema, rtol=0, atol=1e-6)
    unclipped = adam_reference([1.0, -2.0], gradients, [0.025, 0.05], clip=np.inf)[1]
    assert np.abs(unclipped - w2).min() > 1e-3  # clipping shows in the second step

def test_the_fused_adamw_of_a_gpu_takes_the_reference_steps_on_the_cpu():
    gradients = [[3.0, 4.0], [0.3, -0.4]]  # as above: the first clipped to norm 1, lr 0.1 warmed up over 4 steps
    objective = lambda net, batch, step: ((net.w * torch.tensor(gradients[step])).sum(), {})  # noqa: E731
    net = Weights()
    opt = sf.adamw(net, 0.1, 0.0, "cuda")  # what a GPU gets, over CPU tensors: PyTorch's fused AdamW runs on both
    assert opt.defaults["fused"] is True and not sf.adamw(net, 0.1, 0.0, "cpu").defaults["fused"]
    for step in range(2):
        sf.training_step(net, objective, None, step, net, Weights(), opt, 0.1, 4, 1.0, 0.999, "cpu", "fp32")
    w2 = adam_reference([1.0, -2.0], gradients, [0.025, 0.05], clip=1.0)[1]
    np.testing.assert_allclose(net.w.detach().numpy(), w2, rtol=0, atol=1e-6)

def nan_at(bad_step, rank=None):
    """The rectified-flow loss, made NaN at one step: in every process, or in process `rank`."""
    def poisoned(net, x1, step):
        loss, logs = sf.RectifiedFlowLoss()(net, x1, step)
        return (loss * float("nan") if step == bad_step and rank in (None, sf.world()[0]) else loss), logs
    return poisoned

def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    with pytest.raises(sf.TrainingError, match=r"loss is not finite from step 7 on; stopped at step 10.*step 5\)"):
        train_toy_teacher(tmp_path, nan_at(7), sf.TrainingData(torch.randn(100, 2)), ckpt_every=5)
    ckpt = sf.read_checkpoint(tmp_path / "teacher.pt")
    assert ckpt["step"] == 5 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert not (tmp_path / "teacher.pt.tmp").exists()

TINY = ["--steps", "20", "--batch-size", "64", "--teacher-model", "mlp-64x2", "--model", "mlp-64x2",
        "--num-pairs", "256", "--log-every", "10", "--ckpt-every", "10", "--num-samples", "500"]

SHAPES = ["--dataset", "shapes", "--max-images", "16", "--steps", "2", "--batch-size", "4", "--num-pairs", "8",
          "--pairs-batch", "4", "--num-samples", "8", "--preview-every", "0", "--teacher-model", "unet-micro",
          "--model", "unet-micro"]

def run(tmp_path, *argv):
    return sf.main(["--out", str(tmp_path), *TINY, *argv])

def assert_one_line_error(capsys, pattern):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert pattern in err, err

def state_of(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt["step"], ckpt["model"], ckpt["ema"], ckpt["optimizer"]["state"]

def assert_same_tensors(a, b):
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

@pytest.mark.parametrize("stage", ["teacher", "reflow"])
def test_interrupted_and_resumed_training_equals_uninterrupted(tmp_path, stage):
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out in (straight, split):
        assert run(out, "--stage", "teacher") == 0
        assert run(out, "--stage", "pairs") == 0
    assert run(straight, "--stage", stage, "--overwrite", "--steps", "30") == 0
    assert run(split, "--stage", stage, "--overwrite", "--steps", "10") == 0
    assert run(split, "--stage", stage, "--resume", "--steps", "30") == 0
    step_a, model_a, ema_a, opt_a = state_of(straight / f"{stage}.pt")
    step_b, model_b, ema_b, opt_b = state_of(split / f"{stage}.pt")
    assert step_a == step_b == 30
    assert_same_tensors(model_a, model_b)
    assert_same_tensors(ema_a, ema_b)
    for k in opt_a:
        assert_same_tensors(opt_a[k], opt_b[k])

@pytest.fixture
def teacher_run(tmp_path):
    assert run(tmp_path, "--stage", "teacher") == 0
    return tmp_path, (tmp_path / "teacher.pt").read_bytes()

def test_a_checkpoint_write_that_fails_half_way_leaves_the_previous_one(teacher_run, monkeypatch, capsys):
    out, before = teacher_run

    def disk_full(obj, f, *args, **kwargs):  # writes part of the file, then fails
        Path(f).write_bytes(before[:len(before) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", disk_full)
    capsys.readouterr()
    assert run(out, "--stage", "teacher", "--resume", "--steps", "30") == 1
    assert_one_line_error(capsys, "No space left on device")
    assert (out / "teacher.pt").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == [".lock", "history_teacher.jsonl", "history_teacher.png",
                                                     "teacher.pt"]  # no partial file left

def test_ctrl_c_names_the_checkpoint_to_resume_and_exits_130(tmp_path, capsys, monkeypatch):
    loss = sf.RectifiedFlowLoss.__call__

    def interrupted_at_15(self, net, x, step):
        if step == 15:
            raise KeyboardInterrupt
        return loss(self, net, x, step)
    monkeypatch.setattr(sf.RectifiedFlowLoss, "__call__", interrupted_at_15)
    assert run(tmp_path, "--stage", "teacher") == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'teacher.pt'} (step 10)" in err and "--resume" in err
    assert torch.load(tmp_path / "teacher.pt", weights_only=True)["step"] == 10

def test_a_checkpoint_is_written_only_when_the_ema_is_finite_too(tmp_path):
    with pytest.raises(sf.TrainingError, match="the weights or their EMA are not finite at step 5"):
        sf.train(sf.MLP(hidden=16, depth=1), sf.RectifiedFlowLoss(), sf.TrainingData(torch.randn(100, 2)), 10,
                 8, 1e-3, ema_decay=float("nan"), checkpoint=tmp_path / "t.pt", ckpt_every=5)
    assert not (tmp_path / "t.pt").exists()

def out_of_memory_from_call(owner, name, n, monkeypatch):
    """owner.name raises CUDA's out-of-memory error from its n-th call on, as a batch too large for a GPU does."""
    original, calls = getattr(owner, name), []

    def crowded(*args, **kwargs):
        calls.append(1)
        if len(calls) >= n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, crowded)

def test_out_of_memory_in_training_names_the_flag_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    assert run(tmp_path, "--stage", "teacher", "--steps", "10") == 0
    before = (tmp_path / "teacher.pt").read_bytes()
    out_of_memory_from_call(sf.MLP, "forward", 3, monkeypatch)  # the third step of the resumed run
    capsys.readouterr()
    assert run(tmp_path, "--stage", "teacher", "--resume", "--ckpt-every", "100") == 1
    assert_one_line_error(capsys, f"[teacher] out of memory on cpu at step 12: lower --batch-size. Last good "
                                  f"checkpoint: {tmp_path / 'teacher.pt'} (step 10); --resume continues it")
    assert (tmp_path / "teacher.pt").read_bytes() == before


# ----------------------------------------------------------------------------- 8. The pipeline, stage by stage

def test_all_stages_on_a_2d_toy(tmp_path, capsys):
    assert run(tmp_path, "--stage", "all", "--dataset", "moons") == 0
    out = capsys.readouterr().out
    for name in ["teacher.pt", "pairs.pt", "reflow.pt", "distill.pt", "results.json", "trajectories.png"]:
        assert (tmp_path / name).exists(), name
    assert "SlimFlow one-step generator" in out and "SW2 floor" in out
    pairs = torch.load(tmp_path / "pairs.pt", weights_only=True)
    assert pairs["z0"].shape == pairs["z1"].shape == (256, 2)
    # every stage resumes as finished: nothing is retrained or rewritten
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")}
    assert run(tmp_path, "--stage", "all", "--dataset", "moons", "--resume") == 0
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")} == before
    assert run(tmp_path, "--stage", "sample", "--dataset", "moons", "--sampler", "heun", "--nfe", "3") == 0
    assert np.load(tmp_path / "samples_distill.npy").shape == (500, 2)
    assert run(tmp_path, "--stage", "sample", "--dataset", "moons", "--from", "reflow", "--sampler", "euler",
               "--nfe", "2") == 0
    assert "NFE 2" in capsys.readouterr().out

def test_the_default_run_s_generator_beats_one_euler_step_of_its_guide(tmp_path):
    # `python slimflow.py` with a tenth of its steps: the one-step generator is much closer to
    # the data than one Euler step of the 2-rectified flow that guides it (0.59x here; 0.68x in
    # the full default run) and than one Euler step of the teacher (0.28x)
    assert sf.main(["--out", str(tmp_path), "--steps", "300", "--num-samples", "2000"]) == 0
    sw2 = {row["method"]: row["sw2"] for row in json.loads((tmp_path / "results.json").read_text())["rows"]}
    generator = sw2["SlimFlow one-step generator"]
    assert generator < 0.8 * sw2["2-rectified flow (one Euler step)"]
    assert generator < 0.5 * sw2["teacher, 1-RF (one Euler step)"]

def last_log(out, stage):
    """{name: value} of the last training log line of `stage` in printed output."""
    line = [line for line in out.splitlines() if line.startswith(f"[{stage}] step ")][-1]
    return {k: float(v) for k, v in re.findall(r"([a-z]+) (-?\d+\.\d+)(?= |$)", line)}

def test_distill_starts_the_student_from_raw_weights_and_guides_it_by_the_ema(tmp_path, monkeypatch):
    for stage in ("teacher", "pairs", "reflow"):
        assert run(tmp_path, "--stage", stage) == 0
    reflow = sf.read_checkpoint(tmp_path / "reflow.pt")
    assert any(not torch.equal(reflow["model"][k], reflow["ema"][k]) for k in reflow["model"])  # they differ
    seen = {}
    monkeypatch.setattr(sf, "train", lambda net, objective, *args, **kwargs: seen.update(G=net, loss=objective))
    assert run(tmp_path, "--stage", "distill") == 0
    for key, value in seen["G"].net.state_dict().items():  # as the official code: raw weights, a fresh EMA
        assert torch.equal(value.cpu(), reflow["model"][key]), key
    for key, value in seen["loss"].v2.state_dict().items():  # the frozen guide: the EMA
        assert torch.equal(value.cpu(), reflow["ema"][key]), key

def test_distill_stage_weighs_the_regularizer_by_reg_weight(tmp_path, capsys):
    # The student starts as the 2-rectified flow, so the regularizer starts near 0 and its printed value
    # says little; what --reg-weight and --target-form change is the trained student.
    for stage in ("teacher", "pairs", "reflow"):
        assert run(tmp_path, "--stage", stage) == 0
    students = {}
    for weight, form in (("0", "official"), ("0.5", "official"), ("0.5", "paper")):
        capsys.readouterr()
        assert run(tmp_path, "--stage", "distill", "--reg-weight", weight, "--target-form", form, "--overwrite") == 0
        log = last_log(capsys.readouterr().out, "distill")
        if weight == "0":
            assert "reg" not in log and log["loss"] == log["pair"]
        else:
            assert "reg" in log and log["loss"] >= log["pair"]
        students[weight, form] = sf.read_checkpoint(tmp_path / "distill.pt")["model"]
    for a, b in [(("0", "official"), ("0.5", "official")), (("0.5", "official"), ("0.5", "paper"))]:
        assert any(not torch.equal(students[a][k], students[b][k]) for k in students[a]), (a, b)

def test_all_stages_on_shapes_images(tmp_path, capsys):
    argv = ["--dataset", "shapes", "--max-images", "64", "--teacher-model", "unet-micro", "--model", "unet-micro",
            "--steps", "3", "--batch-size", "4", "--num-pairs", "8", "--pairs-batch", "8", "--num-samples", "4",
            "--rtol", "1e-2", "--atol", "1e-2", "--preview-every", "3", "--out", str(tmp_path), "--stage", "all"]
    assert sf.main(argv) == 0
    for stage in sf.FLOW_STAGES:
        x = np.load(tmp_path / f"samples_{stage}.npy")
        assert x.shape == (4, 3, 32, 32) and np.isfinite(x).all()
        assert (tmp_path / f"samples_{stage}.png").exists()
        assert (tmp_path / "previews" / f"{stage}_0000003.png").exists()
    pairs = torch.load(tmp_path / "pairs.pt", weights_only=True)
    assert pairs["z1"].shape == (8, 3, 32, 32)

def test_every_stage_runs_in_bf16_and_channels_last_on_shapes(tmp_path, monkeypatch, lpips_net):
    # a GPU's branches, taken on the CPU: bf16 autocast, the channels_last layout, float16 pairs in every stage
    # that reads them (reflow, distill with L2 and with LPIPS, traflow), then sampling and evaluation
    layouts, to_device = [], sf.to_device
    monkeypatch.setattr(sf, "to_device", lambda *args: layouts.append(to_device(*args)) or layouts[-1])
    argv = [*SHAPES, "--rtol", "1e-2", "--atol", "1e-2", "--precision", "bf16", "--out", str(tmp_path)]
    torch.save(lpips_net.state_dict(), tmp_path / "lpips.pth")
    for stage, *extra in (["teacher"], ["pairs"], ["reflow"], ["distill"],
                          ["distill", "--distance", "lpips", "--lpips-weights", str(tmp_path / "lpips.pth"),
                           "--overwrite"], ["sample", "--from", "distill"]):
        assert sf.main([*argv, "--channels-last", "--stage", stage, *extra]) == 0, stage
    assert all(m.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
               for net in layouts for m in net.modules() if isinstance(m, sf.UNet))
    assert len(layouts) >= 6 and torch.load(tmp_path / "pairs.pt", weights_only=True)["z1"].dtype == torch.float16
    assert sf.main([*argv, "--stage", "traflow"]) == 0  # NCHW: see to_device
    for stage in ("teacher", "reflow", "distill", "traflow"):
        ckpt = sf.read_checkpoint(tmp_path / f"{stage}.pt")
        assert ckpt["step"] == 2 and ckpt["training"]["precision"] == "bf16", stage
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in ckpt["model"].values()), stage
    assert np.isfinite(np.load(tmp_path / "samples_distill.npy")).all()
    extractor = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())
    cfg = sf.parse_args([*argv, "--channels-last", "--stage", "eval", "--from", "traflow", "--data-dir",
                         str(tmp_path / "data")])
    row = sf.stage_eval(cfg, extractor=extractor)
    assert math.isfinite(row["fid"]) and math.isfinite(row["swd"])

def test_all_with_a_given_teacher_trains_no_teacher(tmp_path, capsys):
    given = tmp_path / "given"
    assert run(given, "--stage", "teacher") == 0
    out = tmp_path / "run"
    assert run(out, "--stage", "all", "--teacher-ckpt", str(given / "teacher.pt")) == 0
    assert not (out / "teacher.pt").exists() and (out / "distill.pt").exists()
    assert f"teacher: using {given / 'teacher.pt'}" in capsys.readouterr().out

def test_traflow_stage_on_a_2d_toy(tmp_path, capsys):
    for stage in ("teacher", "pairs"):
        assert run(tmp_path, "--stage", stage) == 0
    assert run(tmp_path, "--stage", "traflow", "--traflow-phases", "10", "--traflow-target", "ema") == 0
    out = capsys.readouterr().out
    assert "cons" in out and "vel" in out  # both phases ran
    for steps in ("1", "2", "4"):
        assert run(tmp_path, "--stage", "eval", "--from", "traflow", "--nfe", steps) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [metrics[key]["nfe"] for key in ("traflow (1 jump) nfe=1", "traflow (2 jumps) nfe=2",
                                            "traflow (4 jumps) nfe=4")] == [1, 2, 4]

def test_traflow_stage_on_shapes(tmp_path):
    argv = ["--dataset", "shapes", "--max-images", "32", "--teacher-model", "unet-micro", "--steps", "2",
            "--batch-size", "2", "--num-pairs", "4", "--pairs-batch", "4", "--rtol", "1e-2", "--atol", "1e-2",
            "--num-samples", "4", "--out", str(tmp_path)]
    for stage in ("teacher", "pairs", "traflow"):
        assert sf.main([*argv, "--stage", stage]) == 0
    assert sf.main([*argv, "--stage", "sample", "--from", "traflow", "--nfe", "2"]) == 0
    assert np.load(tmp_path / "samples_traflow.npy").shape == (4, 3, 32, 32)


# ----------------------------------------------------------------------------- 9. Image data

def test_shapes_images_are_varied_uint8():
    x = sf.shapes_images(50, 32, seed=0)
    assert x.shape == (50, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, sf.shapes_images(50, 32, seed=0))
    per_image_colours = [torch.unique(img.reshape(3, -1), dim=1).shape[1] for img in x]
    assert set(per_image_colours) == {2}  # one shape on a plain background
    assert x.float().std() > 50

def test_idx_files_are_read_like_the_mnist_format(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    header = b"\x00\x00\x08\x03" + b"".join(int(v).to_bytes(4, "big") for v in (3, 28, 28))
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + images.tobytes())
    x = sf.image_dataset("fashion_mnist", tmp_path, image_size=32)
    assert x.shape == (3, 1, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(sf.read_idx_images(tmp_path / "train-images-idx3-ubyte.gz")[:, 0], torch.from_numpy(images))

def test_folder_images_are_resized(tmp_path):
    from PIL import Image
    for i, size in enumerate([(40, 30), (64, 64)]):
        Image.new("RGB", size, (i * 100, 20, 30)).save(tmp_path / f"{i}.png")
    x = sf.image_dataset("folder", tmp_path, image_size=16)
    assert x.shape == (2, 3, 16, 16) and x[1, 0, 0, 0] == 100

def test_offline_download_is_a_one_line_error(tmp_path, monkeypatch):
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(sf.UsageError, match="offline") as err:
        sf.image_dataset("cifar10", tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)

def test_to_unit_range_maps_8_bit_levels_onto_minus_one_to_one():
    levels = sf.to_unit_range(torch.tensor([0, 51, 255], dtype=torch.uint8))
    assert levels.dtype == torch.float32
    torch.testing.assert_close(levels, torch.tensor([-1.0, -0.6, 1.0]), rtol=0, atol=1e-6)
    x = torch.tensor([0.25, -3.0], dtype=torch.float64)
    assert torch.equal(sf.to_unit_range(x), x.float())  # float data (points, pairs) pass through

def test_processes_draw_slices_of_one_global_batch():
    # two processes with batch 4 see exactly the 8 examples one process with batch 8 sees, flips included
    z = torch.randn(50, 1, 2, 3)
    one, rank0, rank1 = (sf.TrainingData(z, 2 * z, flip=True, seed=3) for _ in range(3))
    for _ in range(3):
        whole = one.sample(8)
        parts = rank0.sample(4, rank=0, processes=2), rank1.sample(4, rank=1, processes=2)
        for i in range(2):
            assert torch.equal(whole[i], torch.cat([parts[0][i], parts[1][i]]))

def test_the_data_stream_is_the_seed_s_and_not_the_global_rng():
    z = torch.arange(100.0)[:, None]
    torch.manual_seed(0)
    a = sf.TrainingData(z, seed=1).sample(16)
    torch.manual_seed(1)
    assert torch.equal(a, sf.TrainingData(z, seed=1).sample(16))
    assert not torch.equal(a, sf.TrainingData(z, seed=2).sample(16))

def test_pairs_share_one_flip():
    z = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 1, 1, 4)
    data = sf.TrainingData(z, z.clone(), flip=True)
    torch.manual_seed(0)
    batches = [data.sample(16) for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in batches)
    assert any(torch.equal(a[i, 0, 0], a[i, 0, 0].sort().values.flip(0)) for a, _ in batches for i in range(16))

def test_unreadable_data_files_are_one_line_errors(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "folder"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_text("not an image")
    with pytest.raises(sf.UsageError, match=f"{folder / 'b.png'} is not a readable image"):
        sf.image_dataset("folder", folder)
    header = b"".join(n.to_bytes(4, "big") for n in (2051, 10, 28, 28))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + bytes(28 * 28 * 3))
    with pytest.raises(sf.UsageError, match="is truncated: 3 of its 10 images"):
        sf.read_idx_images(tmp_path / "train-images-idx3-ubyte")


# ----------------------------------------------------------------------------- 10. Two-time networks, official names

OFFICIAL_PARAMS = {"rf-61.8m": 61_804_419, "slim-27.9m": 27_906_179, "slim-15.7m": 15_707_235,
                   "slim-7.0m": 6_989_891, "slim-3.4m": 3_437_123}

@pytest.mark.parametrize("name", OFFICIAL_PARAMS)
def test_unet_has_official_parameter_count(name):
    with torch.device("meta"):  # shapes only: no memory, no init time
        net = sf.UNet(**sf.PRESETS[name])
    assert sf.num_params(net) == OFFICIAL_PARAMS[name]

def test_build_model_rejects_preset_of_the_other_kind():
    with pytest.raises(sf.UsageError, match="does not fit image data"):
        sf.build_model("mlp-96x3", (3, 32, 32))

def test_a_two_time_network_starts_as_the_one_time_network():
    torch.manual_seed(0)
    for one, x in [(sf.MLP(hidden=16, depth=2), torch.randn(4, 2)),
                   (sf.UNet(**sf.PRESETS["unet-micro"]), torch.randn(2, 3, 32, 32))]:
        with torch.no_grad():
            for p in one.parameters():
                p.add_(0.1 * torch.randn_like(p))
        two = type(one)(**({"hidden": 16, "depth": 2} if isinstance(one, sf.MLP) else sf.PRESETS["unet-micro"]),
                        two_times=True)
        two.load_state_dict(sf.add_second_time(one.state_dict()))
        t, s = torch.rand(len(x)), torch.rand(len(x))
        torch.testing.assert_close(two(x, t, t), one(x, t), atol=1e-5, rtol=1e-5)
        # t and s enter alike, as two halves of one embedding; and s is read
        torch.testing.assert_close(two(x, t, s), two(x, s, t), atol=1e-5, rtol=1e-5)
        assert (two(x, t, s) - one(x, t)).abs().max() > 1e-3

def official_ncsnpp(W, x, t, nf, ch_mult, num_res_blocks, attn_resolutions=(16,)):
    """The official NCSN++ forward on the official tensor names W, written here from the
    RectifiedFlow / SlimFlow code (models/ncsnpp.py, layerspp.py: BigGAN residual blocks
    without FIR, AttnBlockpp, skip rescale, positional embedding of 999·t), independently of
    slimflow's UNet: it walks `all_modules.<i>` in order, as the official forward does."""
    n = 0

    def module():  # the tensors of the next official module, by their names inside it
        nonlocal n
        prefix, n = f"all_modules.{n}.", n + 1
        return {k[len(prefix):]: v for k, v in W.items() if k.startswith(prefix)}

    def group_norm(p, h, name=""):
        return F.group_norm(h, min(h.shape[1] // 4, 32), p[f"{name}weight"], p[f"{name}bias"], eps=1e-6)

    def conv(p, h, name=""):
        weight = p[f"{name}weight"]
        return F.conv2d(h, weight, p[f"{name}bias"], padding=weight.shape[-1] // 2)

    def resnet_block(p, x, up=False, down=False):  # ResnetBlockBigGANpp
        h = F.silu(group_norm(p, x, "GroupNorm_0."))
        if up:  # naive_upsample_2d
            h, x = (y.repeat_interleave(2, 2).repeat_interleave(2, 3) for y in (h, x))
        if down:  # naive_downsample_2d
            h, x = (y.unflatten(3, (-1, 2)).unflatten(2, (-1, 2)).mean((3, 5)) for y in (h, x))
        h = conv(p, h, "Conv_0.") + (F.silu(temb) @ p["Dense_0.weight"].T + p["Dense_0.bias"])[:, :, None, None]
        h = conv(p, F.silu(group_norm(p, h, "GroupNorm_1.")), "Conv_1.")
        if "Conv_2.weight" in p:
            x = conv(p, x, "Conv_2.")
        return (x + h) / math.sqrt(2)

    def attention(p, x):  # AttnBlockpp; NIN is x·W + b over channels
        B, C, H, Wd = x.shape
        h = group_norm(p, x, "GroupNorm_0.")
        q, k, v = (torch.einsum("bchw,cd->bdhw", h, p[f"NIN_{i}.W"]) + p[f"NIN_{i}.b"][:, None, None] for i in range(3))
        w = (torch.einsum("bchw,bcij->bhwij", q, k) * C ** -0.5).reshape(B, H, Wd, H * Wd).softmax(-1)
        h = torch.einsum("bhwij,bcij->bchw", w.reshape(B, H, Wd, H, Wd), v)
        h = torch.einsum("bchw,cd->bdhw", h, p["NIN_3.W"]) + p["NIN_3.b"][:, None, None]
        return (x + h) / math.sqrt(2)

    half = nf // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=x.dtype) / (half - 1))
    emb = 999 * t[:, None] * freqs
    emb = torch.cat([emb.sin(), emb.cos()], 1)
    p = module()
    temb = F.silu(emb @ p["weight"].T + p["bias"])
    p = module()
    temb = temb @ p["weight"].T + p["bias"]
    hs = [conv(module(), x)]
    for level in range(len(ch_mult)):
        for _ in range(num_res_blocks):
            h = resnet_block(module(), hs[-1])
            if h.shape[-1] in attn_resolutions:
                h = attention(module(), h)
            hs.append(h)
        if level != len(ch_mult) - 1:
            hs.append(resnet_block(module(), hs[-1], down=True))
    h = resnet_block(module(), hs[-1])
    h = attention(module(), h)
    h = resnet_block(module(), h)
    for level in reversed(range(len(ch_mult))):
        for _ in range(num_res_blocks + 1):
            h = resnet_block(module(), torch.cat([h, hs.pop()], 1))
        if h.shape[-1] in attn_resolutions:
            h = attention(module(), h)
        if level != 0:
            h = resnet_block(module(), h, up=True)
    h = F.silu(group_norm(module(), h))
    h = conv(module(), h)
    assert not hs and not module(), "official modules left unused"
    return h

@pytest.mark.parametrize("config", [dict(nf=16, ch_mult=(1, 2), num_res_blocks=1),
                                    dict(nf=16, ch_mult=(1, 2, 2), num_res_blocks=2)])
def test_unet_computes_the_official_function_from_official_tensors(config, capsys):
    # every official tensor random and distinct, so a tensor in the wrong place (Conv_0 for
    # Conv_1, NIN_0 for NIN_1, a missing transpose) or a wrong wiring changes the output
    net = sf.UNet(**config, dropout=0.0).double().eval()
    g = torch.Generator().manual_seed(0)
    W = {k: 0.3 * torch.randn(v.shape, generator=g, dtype=torch.float64) + (k.endswith("weight") and v.dim() == 1)
         for k, v in sf.to_official(net.state_dict()).items()}  # GroupNorm scales near 1
    net.load_state_dict(sf.from_official(W))
    x, t = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64), torch.tensor([0.3, 0.8], dtype=torch.float64)
    expected = official_ncsnpp(W, x, t, **config)
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(net(x, t), expected, rtol=1e-9, atol=1e-9)

@pytest.mark.parametrize("preset", OFFICIAL_LAYOUTS)
def test_every_official_tensor_maps_to_exactly_one_of_ours_and_back(preset, capsys):
    entries, sha256, spelled_out = OFFICIAL_LAYOUTS[preset]
    with torch.device("meta"):
        ours = sf.UNet(**sf.PRESETS[preset]).state_dict()
    official = {"sigmas": torch.empty(1000, device="meta"), **sf.to_official(ours)}
    lines = layout_lines(official)  # names, shapes and order of the official network's state dict
    assert len(lines) == entries and set(spelled_out) <= set(lines)
    assert sha256_of_lines(lines) == sha256
    converted = sf.from_official(official)
    assert "ignored: sigmas" in capsys.readouterr().out
    assert converted.keys() == ours.keys()  # one to one: no tensor lost, none invented
    assert all(converted[k].shape == ours[k].shape for k in ours)

def official_file(net, path, ema_scale=None, drop=None, reshape=None):
    """An official-layout checkpoint made from our network: `module.` names, EMA list."""
    model = {"module.sigmas": torch.linspace(0.01, 50, 1000),
             **{f"module.{k}": v.clone() for k, v in sf.to_official(net.state_dict()).items()}}
    if drop:
        del model[f"module.{drop}"]
    if reshape:
        model[f"module.{reshape}"] = torch.zeros(3, 3)
    shadow = [v for k, v in model.items() if k != "module.sigmas"]
    if ema_scale is not None:  # EMA weights that differ from the raw ones
        model = {k: (v * ema_scale if k != "module.sigmas" else v) for k, v in model.items()}
    torch.save({"model": model, "ema": {"decay": 0.9999, "num_updates": 10, "shadow_params": shadow},
                "optimizer": {}, "step": 10}, path)

def randomised_unet(two_times=False, seed=0):
    torch.manual_seed(seed)
    net = sf.UNet(**sf.PRESETS["unet-micro"], two_times=two_times).eval()
    with torch.no_grad():  # every tensor non-zero, so a misplaced one changes the output
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net

def test_round_trip_through_an_official_checkpoint_computes_the_same_function(tmp_path):
    net = randomised_unet()
    official_file(net, tmp_path / "official.pth", ema_scale=0.0)  # raw weights zeroed: EMA must be used
    loaded = sf.load_checkpoint(tmp_path / "official.pth", sf.UNet(**sf.PRESETS["unet-micro"]).eval())
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    assert torch.equal(loaded(x, t), net(x, t))

def test_round_trip_through_an_official_checkpoint_gives_its_raw_weights_on_request(tmp_path):  # the student's start
    net = randomised_unet()
    official_file(net, tmp_path / "official.pth", ema_scale=2.0)  # raw weights: twice the EMA's
    raw = sf.load_checkpoint(tmp_path / "official.pth", sf.UNet(**sf.PRESETS["unet-micro"]), weights="model")
    assert all(torch.equal(v, 2 * net.state_dict()[k]) for k, v in raw.state_dict().items())

def test_official_attention_projections_are_transposed(tmp_path):
    net = randomised_unet()
    official = sf.to_official(net.state_dict())
    block = next(i for i, b in enumerate(net.blocks) if isinstance(b, sf.Attention))
    assert torch.equal(official[f"all_modules.{block + 3}.NIN_0.W"], net.blocks[block].q.weight[:, :, 0, 0].t())

@pytest.mark.parametrize("drop, reshape, pattern", [
    ("all_modules.5.Conv_0.bias", None, "tensor all_modules.5.Conv_0.bias is missing"),
    (None, "all_modules.4.Conv_1.weight", "tensor all_modules.4.Conv_1.weight has shape (3, 3), the network needs"),
])
def test_an_official_layout_with_a_bad_tensor_is_refused(tmp_path, drop, reshape, pattern):
    official_file(randomised_unet(), tmp_path / "bad.pth", drop=drop, reshape=reshape)
    with pytest.raises(sf.UsageError, match=pattern.replace("(", r"\(").replace(")", r"\)")):
        sf.load_checkpoint(tmp_path / "bad.pth", sf.UNet(**sf.PRESETS["unet-micro"]))

def test_round_trip_through_an_official_model_without_ema_gives_its_raw_weights(tmp_path):
    net = randomised_unet()
    torch.save({"model": {f"module.{k}": v for k, v in sf.to_official(net.state_dict()).items()}, "step": 0},
               tmp_path / "noema.pth")
    loaded = sf.load_checkpoint(tmp_path / "noema.pth", sf.UNet(**sf.PRESETS["unet-micro"]).eval())
    x, t = torch.randn(2, 3, 32, 32), torch.rand(2)
    assert torch.equal(loaded(x, t), net(x, t))

def test_an_official_ema_of_another_length_is_refused(tmp_path):
    net = randomised_unet()
    model = {f"module.{k}": v for k, v in sf.to_official(net.state_dict()).items()}
    torch.save({"model": model, "ema": {"shadow_params": list(model.values())[:-1]}}, tmp_path / "short.pth")
    with pytest.raises(sf.UsageError, match="EMA holds"):
        sf.load_checkpoint(tmp_path / "short.pth", sf.UNet(**sf.PRESETS["unet-micro"]))

def test_pairs_stage_starts_from_an_official_teacher_made_by_our_conversion(tmp_path, capsys):
    official_file(randomised_unet(), tmp_path / "teacher_official.pth")
    argv = ["--dataset", "shapes", "--out", str(tmp_path), "--stage", "pairs", "--teacher-model", "unet-micro",
            "--teacher-ckpt", str(tmp_path / "teacher_official.pth"), "--num-pairs", "4", "--pairs-batch", "4",
            "--rtol", "1e-2", "--atol", "1e-2"]
    assert sf.main(argv) == 0
    assert torch.load(tmp_path / "pairs.pt", weights_only=True)["z1"].shape == (4, 3, 32, 32)


# ----------------------------------------------------------------------------- 11. Checkpoints
# One line on stderr, exit status 2, and nothing that exists is modified.

def test_a_checkpoint_without_the_data_stream_is_not_resumed(teacher_run, capsys):
    out, _ = teacher_run
    ckpt = torch.load(out / "teacher.pt", weights_only=True)
    ckpt["rng"] = ckpt["rng"]["processes"][0]  # the layout of older slimflow checkpoints
    torch.save(ckpt, out / "teacher.pt")
    before = (out / "teacher.pt").read_bytes()
    capsys.readouterr()
    assert run(out, "--stage", "teacher", "--resume", "--steps", "40") == 2
    assert_one_line_error(capsys, "written by an older slimflow")
    assert (out / "teacher.pt").read_bytes() == before

def test_resuming_with_another_architecture_is_refused(teacher_run, capsys):
    out, before = teacher_run
    capsys.readouterr()
    assert run(out, "--stage", "teacher", "--resume", "--steps", "40", "--teacher-model", "mlp-96x3") == 2
    assert_one_line_error(capsys, "holds a 'mlp-64x2' network, not 'mlp-96x3'")
    assert (out / "teacher.pt").read_bytes() == before

def test_a_checkpoint_of_another_dataset_is_refused(teacher_run, capsys):
    out, before = teacher_run
    capsys.readouterr()
    assert run(out, "--stage", "pairs", "--dataset", "moons") == 2
    assert_one_line_error(capsys, "made for dataset '8gaussians', not 'moons'")
    assert not (out / "pairs.pt").exists()

@pytest.mark.parametrize("garbage", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_a_corrupt_checkpoint_is_a_one_line_error(teacher_run, capsys, garbage):
    out, _ = teacher_run
    (out / "teacher.pt").write_bytes(garbage)
    capsys.readouterr()
    assert run(out, "--stage", "teacher", "--resume", "--steps", "40") == 2
    assert_one_line_error(capsys, "is corrupt or not a slimflow file")
    assert (out / "teacher.pt").read_bytes() == garbage
    assert run(out, "--stage", "sample", "--from", "teacher") == 2

def test_a_checkpoint_of_another_stage_is_refused(tmp_path, capsys):
    for stage in ("teacher", "pairs"):
        assert run(tmp_path, "--stage", stage) == 0
    capsys.readouterr()
    assert run(tmp_path, "--stage", "sample", "--teacher-ckpt", str(tmp_path / "pairs.pt"), "--from", "teacher") == 2
    assert_one_line_error(capsys, "holds the 'pairs' stage, not 'teacher'")

def test_a_checkpoint_of_another_image_size_is_refused(tmp_path, capsys):
    assert sf.main(["--out", str(tmp_path), *SHAPES, "--stage", "teacher"]) == 0
    capsys.readouterr()
    assert sf.main(["--out", str(tmp_path), *SHAPES, "--stage", "pairs", "--image-size", "16"]) == 2
    assert_one_line_error(capsys, "holds data of shape (3, 32, 32), not (3, 16, 16)")

def test_corrupt_json_files_are_one_line_errors(tmp_path, capsys):
    assert run(tmp_path, "--stage", "teacher") == 0
    (tmp_path / "metrics.json").write_text("{corrupt")
    capsys.readouterr()
    assert run(tmp_path, "--stage", "eval", "--from", "teacher") == 2
    assert_one_line_error(capsys, f"{tmp_path / 'metrics.json'} is corrupt")
    (tmp_path / "metrics.json").unlink()
    (tmp_path / "pairs.shards").mkdir()
    (tmp_path / "pairs.shards" / "recipe.json").write_text("{corrupt")
    assert run(tmp_path, "--stage", "pairs") == 2
    assert_one_line_error(capsys, f"{tmp_path / 'pairs.shards' / 'recipe.json'} is corrupt")
    (tmp_path / "history_teacher.jsonl").write_text('{"step": 10, "loss": 1.0}\n{corrupt\n')
    before = (tmp_path / "teacher.pt").read_bytes()
    assert run(tmp_path, "--stage", "teacher", "--resume", "--steps", "30") == 2  # before any step
    assert_one_line_error(capsys, f"{tmp_path / 'history_teacher.jsonl'} is corrupt")
    assert (tmp_path / "teacher.pt").read_bytes() == before

def test_json_files_are_written_atomically(tmp_path, monkeypatch):
    assert run(tmp_path, "--stage", "teacher") == 0
    assert run(tmp_path, "--stage", "eval", "--from", "teacher") == 0
    before = (tmp_path / "metrics.json").read_bytes()
    monkeypatch.setattr(os, "replace", never("replaced"))
    with pytest.raises(AssertionError):
        run(tmp_path, "--stage", "eval", "--from", "teacher", "--sampler", "euler")
    assert (tmp_path / "metrics.json").read_bytes() == before

def test_a_full_disk_under_torch_save_is_one_line_and_leaves_no_file(tmp_path, capsys, monkeypatch):
    def writer_fails(obj, f, *args, **kwargs):  # what torch.save raises when the disk fills
        Path(f).write_bytes(b"part")
        raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 5056 vs 4950\nmore")
    monkeypatch.setattr(torch, "save", writer_fails)
    assert run(tmp_path, "--stage", "teacher") == 1
    assert_one_line_error(capsys, f"could not write {tmp_path / 'teacher.pt'} ([enforce fail")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


# ----------------------------------------------------------------------------- 12. The run directory

def test_a_checkpoint_by_url_is_downloaded_once(tmp_path, capsys):
    import http.server
    import threading
    assert run(tmp_path / "given", "--stage", "teacher") == 0
    requests = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "given"), **kwargs)

        def log_message(self, *args):
            requests.append(args)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/teacher.pt"
    try:
        for out in ("a", "b"):
            assert run(tmp_path / out, "--stage", "pairs", "--teacher-ckpt", url, "--data-dir", str(tmp_path / "data")) == 0
    finally:
        server.shutdown()
        server.server_close()
    assert len(requests) == 1 and "[download] teacher.pt" in capsys.readouterr().out
    pairs = [torch.load(tmp_path / out / "pairs.pt", weights_only=True)["z1"] for out in ("a", "b")]
    assert torch.equal(pairs[0], pairs[1])
    assert run(tmp_path / "c", "--stage", "pairs", "--teacher-ckpt", url + "?x") == 2  # the server is gone
    assert_one_line_error(capsys, "could not download the checkpoint http://127.0.0.1")

def test_a_stage_without_its_input_names_the_command_that_makes_it(tmp_path, capsys):
    assert run(tmp_path, "--stage", "pairs") == 2
    assert_one_line_error(capsys, f"make it with: python slimflow.py --dataset 8gaussians --out {tmp_path} --stage teacher")

def test_finished_work_is_not_overwritten_without_asking(teacher_run, capsys):
    out, before = teacher_run
    capsys.readouterr()
    assert run(out, "--stage", "teacher") == 2
    assert_one_line_error(capsys, "pass --resume to continue it or --overwrite")
    assert (out / "teacher.pt").read_bytes() == before

def test_an_out_that_is_a_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert sf.main(["--out", str(tmp_path / "file"), *TINY, "--stage", "teacher"]) == 2
    out, err = capsys.readouterr()
    assert "step" not in out and err.count("\n") == 1 and "--out" in err and str(tmp_path / "file") in err
    assert (tmp_path / "file").read_text() == "mine"


def test_progress_gives_the_recent_rate_and_the_time_left_on_a_fake_clock():
    now = [100.0]
    progress = sf.Progress(1000, window=2, clock=lambda: now[0])
    now[0] = 110.0
    assert progress.update(100) == (10.0, 90.0)  # 100 in 10 s: 900 left at 10/s
    now[0], now[0] = 115.0, 115.0
    assert progress.update(200) == pytest.approx((200 / 15, 800 / (200 / 15)))
    now[0] = 116.0  # the last two updates: 200 in 6 s, not 300 in 16 s since the start
    assert progress.update(300) == pytest.approx((200 / 6, 700 / (200 / 6)))
    assert progress.elapsed() == 16.0
    assert [sf.duration(x) for x in (21.0, 125.0, 3725.0, math.inf)] == ["21.0s", "2m05s", "1h02m", "?"]
    now[0] = 176.0  # a compilation of 60 s in step 301, then 100 steps in 10 s: 10/s, not 101 in 70 s
    progress.restart(301)
    now[0] = 186.0
    assert progress.update(401) == (10.0, 59.9) and progress.elapsed() == 86.0

def test_progress_lines_say_the_time_left_and_the_last_line_the_wall_time(tmp_path, capsys):
    assert run(tmp_path, "--stage", "teacher") == 0
    out = capsys.readouterr().out
    assert re.search(r"^\[teacher\] step 10/20  loss \d+\.\d{4}  \d+\.\d it/s  [\dhms.]+ left$", out, re.M), out
    assert re.search(r"^\[teacher\] step 20/20 .* 0\.0s left$", out, re.M), out
    assert re.search(r"^\[teacher\] 20 steps in [\dhms.]+$", out.splitlines()[-1]), out
    assert run(tmp_path, "--stage", "pairs", "--pairs-batch", "128") == 0
    out = capsys.readouterr().out
    assert re.search(r"^\[pairs\] shard 000000000-000000128  NFE \d+  1/2 shards in [\dhms.]+, [\dhms.]+ left$", out,
                     re.M), out
    assert re.search(r"^\[pairs\] wrote 256 pairs to .* in [\dhms.]+$", out, re.M), out
    assert run(tmp_path, "--stage", "sample", "--pairs-batch", "200", "--sampler", "euler", "--nfe", "2") == 0
    out = capsys.readouterr().out
    assert re.search(r"^\[sample\] 200/500 samples  \d+ img/s  [\dhms.]+ left$", out, re.M), out  # a log: lines
    assert re.search(r"^\[sample\] 500/500 samples .* 0\.0s left\n\[sample\] 500 samples in [\dhms.]+$", out, re.M)

def history_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]

def test_the_history_of_a_resumed_run_is_that_of_an_uninterrupted_one(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    every = ["--log-every", "2", "--ckpt-every", "4"]
    assert run(straight, "--stage", "teacher", *every) == 0
    assert run(split, "--stage", "teacher", *every, "--steps", "10") == 0  # saved at 4, 8 and 10
    assert [r["step"] for r in history_of(split / "history_teacher.jsonl")] == [2, 4, 6, 8, 10]
    assert run(split, "--stage", "teacher", *every, "--resume") == 0
    a, b = history_of(straight / "history_teacher.jsonl"), history_of(split / "history_teacher.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(2, 21, 2))  # none twice, none missing
    assert [(r["loss"], r["lr"]) for r in a] == [(r["loss"], r["lr"]) for r in b]  # resumed bit for bit
    assert a[0]["lr"] == pytest.approx(1e-3 * 2 / 100) and all(r["it/s"] > 0 for r in a)  # the 2nd step's warm-up
    assert (split / "history_teacher.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

def test_the_history_keeps_what_a_resumed_run_redoes_once(tmp_path):
    history = sf.History(tmp_path, "reflow")
    for step in (2, 4, 6, 8):
        history.add(step, {"loss": 1.0 / step})
    history.add(4, {"straightness": 0.5})  # a preview's value joins the step's line
    history.save()
    again = sf.History(tmp_path, "reflow")
    again.start(4)  # resumed from the checkpoint of step 4: steps 6 and 8 are done again, and only step 6 is yet
    again.add(6, {"loss": 0.1})
    again.save()
    assert history_of(tmp_path / "history_reflow.jsonl") == [
        {"step": 2, "loss": 0.5}, {"step": 4, "loss": 0.25, "straightness": 0.5}, {"step": 6, "loss": 0.1}]

def test_reflow_records_its_straightness_at_each_preview(tmp_path):
    for stage in ("teacher", "pairs"):
        assert run(tmp_path, "--stage", stage) == 0
    assert run(tmp_path, "--stage", "reflow", "--preview-every", "10") == 0
    rows = {r["step"]: r for r in history_of(tmp_path / "history_reflow.jsonl")}
    assert rows[10]["straightness"] > 0 and rows[20]["straightness"] > 0 and "beta" in rows[20]
    assert (tmp_path / "previews" / "reflow_0000010.png").exists()


# ----------------------------------------------------------------------------- 13. Pairs in shards

def test_image_pairs_are_float16_and_exact_for_their_rounded_noise(tmp_path):
    argv = ["--dataset", "shapes", "--max-images", "32", "--teacher-model", "unet-micro", "--steps", "2",
            "--batch-size", "2", "--num-pairs", "6", "--pairs-batch", "4", "--rtol", "1e-2", "--atol", "1e-2",
            "--out", str(tmp_path), "--device", "cpu"]  # re-solved bit for bit: on the device that solved it
    for stage in ("teacher", "pairs"):
        assert sf.main([*argv, "--stage", stage]) == 0
    pairs = torch.load(tmp_path / "pairs.pt", weights_only=True)
    assert pairs["z0"].dtype == pairs["z1"].dtype == torch.float16 and pairs["z0"].shape == (6, 3, 32, 32)
    teacher, _ = sf.load_stage_network(sf.parse_args([*argv, "--stage", "pairs"]), "teacher")
    z1, _ = sf.rk45_sample(teacher, pairs["z0"][4:].float(), rtol=1e-2, atol=1e-2)  # the second shard, re-solved
    assert torch.equal(z1.half(), pairs["z1"][4:])
    assert not (tmp_path / "pairs.shards").exists()  # joined and removed

def test_stopped_pair_generation_continues_with_the_missing_shards(tmp_path, monkeypatch):
    for out in ("straight", "split"):
        assert run(tmp_path / out, "--stage", "teacher") == 0
    assert run(tmp_path / "straight", "--stage", "pairs", "--pairs-batch", "64") == 0
    solve, calls = sf.rk45_sample, []

    def stops_after_two(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return solve(*a, **k)
    monkeypatch.setattr(sf, "rk45_sample", stops_after_two)
    assert run(tmp_path / "split", "--stage", "pairs", "--pairs-batch", "64") == 130  # Ctrl-C
    assert len(list((tmp_path / "split" / "pairs.shards").glob("*.pt"))) == 2
    calls.clear()
    monkeypatch.setattr(sf, "rk45_sample", lambda *a, **k: calls.append(1) or solve(*a, **k))
    assert run(tmp_path / "split", "--stage", "pairs", "--pairs-batch", "64") == 0
    assert len(calls) == 2  # 256 pairs: 4 shards, 2 already solved
    a, b = (torch.load(tmp_path / out / "pairs.pt", weights_only=True) for out in ("straight", "split"))
    assert torch.equal(a["z0"], b["z0"]) and torch.equal(a["z1"], b["z1"])

def test_shards_of_another_teacher_are_refused(tmp_path, capsys, monkeypatch):
    assert run(tmp_path, "--stage", "teacher") == 0
    monkeypatch.setattr(sf, "rk45_sample", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run(tmp_path, "--stage", "pairs", "--pairs-batch", "64") == 130
    monkeypatch.undo()
    assert run(tmp_path, "--stage", "teacher", "--overwrite", "--lr", "3e-2") == 0  # same path, same steps
    capsys.readouterr()
    assert run(tmp_path, "--stage", "pairs", "--pairs-batch", "64") == 2
    assert_one_line_error(capsys, "holds shards solved with another teacher;")

def test_finished_pairs_of_another_teacher_are_not_reused(tmp_path, capsys):
    assert run(tmp_path, "--stage", "teacher") == 0
    assert run(tmp_path, "--stage", "pairs") == 0
    assert run(tmp_path, "--stage", "pairs", "--resume") == 0  # same teacher and recipe: reused
    assert "reusing" in capsys.readouterr().out
    assert run(tmp_path, "--stage", "teacher", "--steps", "30", "--resume") == 0  # the teacher trains on
    before = (tmp_path / "pairs.pt").read_bytes()
    capsys.readouterr()
    assert run(tmp_path, "--stage", "pairs", "--resume") == 2
    assert_one_line_error(capsys, f"was solved with another teacher; solve them again with: python slimflow.py "
                                  f"--dataset 8gaussians --out {tmp_path} --stage pairs --overwrite")
    assert (tmp_path / "pairs.pt").read_bytes() == before
    assert run(tmp_path, "--stage", "pairs", "--resume", "--num-pairs", "512") == 2
    assert_one_line_error(capsys, "was solved with another num_pairs, teacher;")

def test_shards_of_another_run_are_refused_until_overwrite(tmp_path, capsys):
    assert run(tmp_path, "--stage", "teacher") == 0
    shards = tmp_path / "pairs.shards"
    shards.mkdir()
    (shards / "recipe.json").write_text(json.dumps({"seed": 7}))
    (shards / "000000000-000000064.pt").write_bytes(b"stale")
    capsys.readouterr()
    assert run(tmp_path, "--stage", "pairs", "--pairs-batch", "64") == 2
    assert_one_line_error(capsys, "holds shards solved with another dataset, shape, seed")
    assert run(tmp_path, "--stage", "pairs", "--pairs-batch", "64", "--overwrite") == 0
    assert torch.load(tmp_path / "pairs.pt", weights_only=True)["z1"].shape == (256, 2)

def test_shards_of_another_pairs_batch_are_refused(tmp_path, capsys, monkeypatch):
    assert run(tmp_path, "--stage", "teacher") == 0
    monkeypatch.setattr(sf, "rk45_sample", never("solved"))
    with pytest.raises(AssertionError):  # stopped at the first solve, after the recipe is written
        run(tmp_path, "--stage", "pairs", "--pairs-batch", "64")
    monkeypatch.undo()
    capsys.readouterr()
    assert run(tmp_path, "--stage", "pairs", "--pairs-batch", "128") == 2
    assert_one_line_error(capsys, "holds shards solved with another pairs_batch;")

def test_out_of_memory_in_pairs_names_the_flag_and_keeps_the_shards(tmp_path, capsys, monkeypatch):
    assert run(tmp_path, "--stage", "teacher") == 0
    out_of_memory_from_call(sf, "rk45_sample", 2, monkeypatch)  # the second shard
    capsys.readouterr()
    assert run(tmp_path, "--stage", "pairs", "--pairs-batch", "64") == 1
    assert_one_line_error(capsys, f"[pairs] out of memory on cpu solving 64 pairs at once: lower --pairs-batch and "
                                  f"pass --overwrite, which solves every shard again (the shard size is part of the "
                                  f"recipe); until then the shards solved stay in {tmp_path / 'pairs.shards'}")
    shard = sf.load_file(tmp_path / "pairs.shards" / "000000000-000000064.pt", "a pairs shard")
    assert shard["z1"].shape == (64, 2) and not (tmp_path / "pairs.pt").exists()


# ----------------------------------------------------------------------------- 14. Several processes
# Two CPU processes with gloo, started by torch.multiprocessing with the environment that
# torchrun gives its processes (torchrun starts them the same way on GPUs, with NCCL).

def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

class FixedTimeVelocityLoss:
    """Velocity regression at t = 1/2 on pairs: no noise of its own, so the data stream is
    the only randomness, and 1 and 2 processes must take the same steps."""

    def __call__(self, net, pair, step):
        z0, z1 = pair
        t = torch.full((len(z0),), 0.5)
        return (net(sf.interpolate(z0, z1, t), t) - (z1 - z0)).square().mean(), {}

def train_fixed_time(out, batch_size):
    sf.start_processes("cpu")
    torch.manual_seed(0)
    pairs = sf.TrainingData(torch.randn(500, 2), torch.randn(500, 2), seed=5)
    meta = dict(stage="reflow", dataset="8gaussians", model_name="mlp-64x2", data_shape=[2])
    sf.train(sf.build_model("mlp-64x2", (2,)), FixedTimeVelocityLoss(), pairs,
             **{**TOY_TRAINING, "batch_size": batch_size, "ckpt_every": 1000}, checkpoint=out / "reflow.pt", meta=meta)

def join_two(rank, port):
    """The environment torchrun gives process `rank` of 2."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")

def gloo_threads():
    """Names of the threads of torch's gloo backend in this process (None off Linux)."""
    tasks = Path("/proc/self/task")
    if not tasks.exists():
        return None
    return [name for name in ((t / "comm").read_text().strip() for t in tasks.iterdir()) if "gloo" in name]

def ddp_worker(rank, port, out):
    join_two(rank, port)
    train_fixed_time(out, 32)
    running = gloo_threads()
    sf.stop_processes()
    if running is not None:  # none outlives the group: one left running at exit can abort Python
        assert running and not gloo_threads()

def test_two_processes_take_the_steps_of_one_process_with_their_global_batch(tmp_path):
    torch.multiprocessing.spawn(ddp_worker, args=(free_port(), tmp_path / "two"), nprocs=2)
    train_fixed_time(tmp_path / "one", 64)
    two, one = (torch.load(tmp_path / out / "reflow.pt", weights_only=True) for out in ("two", "one"))
    assert two["step"] == one["step"] == 20 and len(two["rng"]["processes"]) == 2
    for key in ("model", "ema"):
        for name in one[key]:
            torch.testing.assert_close(two[key][name], one[key][name], rtol=1e-5, atol=1e-6)
    assert (two["model"]["net.0.weight"] - sf.build_model("mlp-64x2", (2,)).state_dict()["net.0.weight"]).abs().max() > 1e-3

def nan_worker(rank, port, out):
    join_two(rank, port)
    sf.start_processes("cpu")
    with pytest.raises(sf.TrainingError, match="not finite from step 7 on; stopped at step 10"):
        train_toy_teacher(out, nan_at(7, rank=1), sf.TrainingData(torch.randn(100, 2)), ckpt_every=5)
    sf.stop_processes()

def test_a_nan_in_one_process_stops_every_process(tmp_path):
    torch.multiprocessing.spawn(nan_worker, args=(free_port(), tmp_path), nprocs=2)  # neither waits forever
    assert sf.read_checkpoint(tmp_path / "teacher.pt")["step"] == 5

def main_worker(rank, port, argv):
    join_two(rank, port)
    assert sf.main(argv) == 0

def two_processes(out, *argv, device="cpu"):
    """slimflow's command line in two processes, as torchrun --nproc_per_node 2 starts it: on CPUs with gloo
    (a one-GPU machine has no cuda:1 for the second), or with device="cuda" one GPU each with NCCL."""
    argv = ["--out", str(out), *TINY, "--pairs-batch", "64", "--device", device, *argv]
    torch.multiprocessing.spawn(main_worker, args=(free_port(), argv), nprocs=2)

def test_two_processes_run_every_stage_and_write_once(tmp_path, capfd):
    two_processes(tmp_path, "--stage", "all")
    out = capfd.readouterr().out
    assert out.count("[teacher] step 20/20") == 1 and out.count("SlimFlow one-step generator") == 1
    assert "x 2 processes" in out
    histories = [f"history_{stage}.{kind}" for stage in ("distill", "reflow", "teacher") for kind in ("jsonl", "png")]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "distill.pt", *histories, "pairs.pt", "reflow.pt",
                                                         "results.json", "teacher.pt", "trajectories.png"]
    two_processes(tmp_path, "--stage", "traflow")  # forward-mode AD through DistributedDataParallel
    assert sf.read_checkpoint(tmp_path / "traflow.pt")["step"] == 20
    # the pairs do not depend on how many processes solved them
    assert run(tmp_path / "one", "--stage", "pairs", "--pairs-batch", "64", "--device", "cpu", "--teacher-ckpt",
               str(tmp_path / "teacher.pt")) == 0
    a, b = (torch.load(path / "pairs.pt", weights_only=True) for path in (tmp_path, tmp_path / "one"))
    assert torch.equal(a["z0"], b["z0"]) and torch.equal(a["z1"], b["z1"])

def test_two_processes_resume_exactly(tmp_path):
    two_processes(tmp_path / "straight", "--stage", "teacher", "--steps", "12", "--ckpt-every", "6")
    two_processes(tmp_path / "split", "--stage", "teacher", "--steps", "6")
    two_processes(tmp_path / "split", "--stage", "teacher", "--steps", "12", "--resume")
    step_a, model_a, ema_a, opt_a = state_of(tmp_path / "straight" / "teacher.pt")
    step_b, model_b, ema_b, opt_b = state_of(tmp_path / "split" / "teacher.pt")
    assert step_a == step_b == 12
    assert_same_tensors(model_a, model_b)
    assert_same_tensors(ema_a, ema_b)

@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between two processes needs two GPUs")
def test_two_processes_on_two_gpus_run_every_stage_with_nccl(tmp_path, capfd):
    two_processes(tmp_path, "--stage", "all", device="cuda")
    assert "x 2 processes" in capfd.readouterr().out
    for stage in ("teacher", "reflow", "distill"):
        ckpt = sf.read_checkpoint(tmp_path / f"{stage}.pt")
        assert ckpt["step"] == 20 and len(ckpt["rng"]["processes"]) == 2
        assert all(torch.isfinite(v).all() for v in ckpt["model"].values())

def test_out_of_memory_says_how_much_memory_the_gpu_has(monkeypatch):
    sizes = {0: 80 * 2**30, 1: 141 * 2**30}
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(total_memory=sizes[i]))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # what --device cuda means under torchrun's rank 1
    assert sf.device_memory("cuda:0") == "cuda:0 (80.0 GiB)" and sf.device_memory("cuda") == "cuda:1 (141.0 GiB)"
    assert sf.device_memory("cpu") == "cpu"


# ----------------------------------------------------------------------------- 15. Pretrained feature networks: FID's Inception and LPIPS

def random_fid_weights():
    """A state dict laid out exactly as the published file (no num_batches_tracked)."""
    g = torch.Generator().manual_seed(0)
    state = {k: 0.05 * torch.randn(v.shape, generator=g) for k, v in sf.fid_inception().state_dict().items()
             if not k.endswith("num_batches_tracked")}
    for k in state:  # plausible BatchNorm statistics keep activations finite
        if k.endswith(("running_var", "bn.weight")):
            state[k] = 0.75 + 0.5 * torch.rand(state[k].shape, generator=g)
    return state

@pytest.fixture(scope="module")
def fid_net():
    return sf.fid_inception(random_fid_weights())

def test_fid_network_has_the_reference_layout():
    entries, sha256, spelled_out = FID_LAYOUT
    lines = sorted(layout_lines(sf.fid_inception().state_dict()))
    assert len(lines) == entries and set(spelled_out) <= set(lines)
    assert sha256_of_lines(lines) == sha256

def test_fid_network_sees_299_by_299_rgb_images(fid_net):
    seen = []
    hook = fid_net.Conv2d_1a_3x3.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        fid_net(torch.zeros(2, 1, 32, 32))
    hook.remove()
    assert seen == [(2, 3, 299, 299)]

@pytest.mark.parametrize("image, size, expected", [
    ([[10., 30.], [50., 70.]], 4, [[10, 20, 30, 30], [30, 40, 50, 50], [50, 60, 70, 70], [50, 60, 70, 70]]),
    ([[0., 100., 200.], [300., 400., 500.], [600., 700., 800.]], 2, [[0, 150], [450, 600]]),
])
def test_tf1_resize_samples_output_pixel_i_at_i_times_in_over_out(image, size, expected):
    # worked out by hand: sources at 0, 0.5, 1, 1.5 (clamped) and at 0, 1.5. PyTorch's
    # align_corners=False gives [[10, 15, 25, 30], ...] and [[100, 250], [550, 700]]
    x = torch.tensor(image)[None, None]
    assert torch.equal(sf.tf1_resize(x, size), torch.tensor(expected, dtype=torch.float32)[None, None])

def test_fid_network_sees_8_bit_values_scaled_as_the_tensorflow_graph(fid_net):
    seen = []
    hook = fid_net.Conv2d_1a_3x3.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        fid_net(torch.tensor([-1.0, 1.0]).repeat(1, 3, 4, 1))  # two columns: 8-bit 0 and 255
    hook.remove()
    row = seen[0][0, 0, 0]  # output column i samples at 2i/299: a ramp to column 1, then 255 for i >= 150
    assert row[0] == -1 and (row[1:150] > row[:149]).all() and torch.equal(row[150:].unique(), torch.tensor([127 / 128]))

def test_fid_network_gives_2048_features_for_rgb_and_grey(fid_net):
    with torch.no_grad():
        rgb = fid_net(torch.rand(2, 3, 32, 32) * 2 - 1)
        grey = torch.rand(2, 1, 28, 28) * 2 - 1
        f_grey, f_repeated = fid_net(grey), fid_net(grey.repeat(1, 3, 1, 1))
    assert rgb.shape == f_grey.shape == (2, 2048) and torch.isfinite(rgb).all() and rgb.std() > 0
    torch.testing.assert_close(f_grey, f_repeated)

def test_fid_network_pools_the_tensorflow_way(fid_net):
    with torch.no_grad():  # the pool branch is the last slice of each block's output
        x = torch.randn(1, 192, 9, 9)
        torch.testing.assert_close(fid_net.Mixed_5b(x)[:, -32:],
                                   fid_net.Mixed_5b.branch_pool(F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)))
        x = torch.randn(1, 2048, 5, 5)
        torch.testing.assert_close(fid_net.Mixed_7c(x)[:, -192:], fid_net.Mixed_7c.branch_pool(F.max_pool2d(x, 3, 1, 1)))

@pytest.mark.parametrize("change, match", [
    (lambda s: s.__setitem__("fc.weight", torch.zeros(1000, 2048)), "fc.weight"),
    (lambda s: s.__setitem__("AuxLogits.fc.weight", torch.zeros(1008, 768)), "AuxLogits.fc.weight"),
    (lambda s: s.pop("Mixed_7c.branch_pool.conv.weight"), "Mixed_7c.branch_pool.conv.weight"),
])
def test_fid_network_refuses_another_layout(change, match):
    state = random_fid_weights()
    change(state)
    with pytest.raises(sf.UsageError, match=match):  # bad input: one line, exit status 2
        sf.fid_inception(state)

def fid_weights(folder):
    return sf.download(sf.FID_WEIGHTS_URL, folder, "the FID Inception weights", "--fid-weights")

def test_fid_weights_offline_is_a_clear_error_naming_the_path(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(sf.UsageError, match="put it at") as err:
        fid_weights(tmp_path / "cache")
    assert str((tmp_path / "cache" / "pt_inception-2015-12-05-6726825d.pth").resolve()) in str(err.value)
    assert not any((tmp_path / "cache").iterdir())  # no partial file left behind
    (tmp_path / "cache" / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"x")
    assert fid_weights(tmp_path / "cache").name == "pt_inception-2015-12-05-6726825d.pth"

@pytest.fixture(scope="module")
def lpips_net():
    return sf.lpips_network()

def test_lpips_has_the_layout_of_the_lpips_package(lpips_net):
    shapes = {k: tuple(v.shape) for k, v in lpips_net.state_dict().items()}
    convs = [(64, 3), (64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (256, 256), (512, 256), (512, 512),
             (512, 512), (512, 512), (512, 512), (512, 512)]  # VGG16's 13 convolutions, numbered as torchvision's
    indices = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
    slices = [1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    expected = {"scaling_layer.shift": (1, 3, 1, 1), "scaling_layer.scale": (1, 3, 1, 1)}
    for (c_out, c_in), i, k in zip(convs, indices, slices):
        expected.update({f"net.slice{k}.{i}.weight": (c_out, c_in, 3, 3), f"net.slice{k}.{i}.bias": (c_out,)})
    for k, c in enumerate((64, 128, 256, 512, 512)):
        expected.update({f"lin{k}.model.1.weight": (1, c, 1, 1), f"lins.{k}.model.1.weight": (1, c, 1, 1)})
    assert shapes == expected

def test_lpips_is_zero_on_equal_images_and_symmetric(lpips_net):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(3, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    with torch.no_grad():
        assert torch.equal(lpips_net(a, a), torch.zeros(3))
        d = lpips_net(a, b)
        assert d.shape == (3,) and (d != 0).all() and torch.allclose(d, lpips_net(b, a), rtol=1e-6)

def test_lpips_by_hand_on_plain_colours():
    # convolutions that pass the 3 colour channels through (centre tap 1, biases 0), so every
    # depth sees relu((x - shift)/scale) of the plain colour; the linear layers weigh channel 0
    # by 1, 1 by 2 and 2 by 3: LPIPS = 5 depths · Σ_c w_c·(û_a - û_b)_c² with û the unit vector
    net = sf.lpips_network()
    state = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    for key in state:
        if key.startswith("net.") and key.endswith("weight"):
            for c in range(3):
                state[key][c, c, 1, 1] = 1.0
        if key.startswith("lin"):
            state[key][0, :3] = torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    shift, scale = torch.tensor([-0.030, -0.088, -0.188]), torch.tensor([0.458, 0.448, 0.450])
    state.update({"scaling_layer.shift": shift.view(1, 3, 1, 1), "scaling_layer.scale": scale.view(1, 3, 1, 1)})
    net = sf.lpips_network(state)
    a, b = torch.tensor([0.2, 0.5, -0.1]), torch.tensor([0.9, 0.1, 0.3])
    unit = [((x - shift) / scale).clamp(min=0) / ((x - shift) / scale).clamp(min=0).norm() for x in (a, b)]
    expected = 5 * (torch.tensor([1.0, 2.0, 3.0]) * (unit[0] - unit[1]).square()).sum()
    with torch.no_grad():
        d = net(a.view(1, 3, 1, 1).expand(2, 3, 16, 16), b.view(1, 3, 1, 1).expand(2, 3, 16, 16))
    torch.testing.assert_close(d, expected.expand(2), rtol=1e-5, atol=0)

def test_the_distillation_distance_is_lpips_at_64_by_64(tmp_path, lpips_net):
    torch.save(lpips_net.state_dict(), tmp_path / "lpips.pth")
    cfg = sf.settings_for({"dataset": "shapes", "lpips_weights": str(tmp_path / "lpips.pth"), "device": "cpu"},
                          "distill")
    a, b = torch.rand(2, 1, 28, 28) * 2 - 1, torch.rand(2, 1, 28, 28) * 2 - 1  # grey: seen as RGB
    up = [F.interpolate(x.repeat(1, 3, 1, 1), size=64, mode="bilinear", align_corners=True) for x in (a, b)]
    with torch.no_grad():  # the official lpips_forward_wrapper(size=64)
        torch.testing.assert_close(sf.lpips_distance(cfg)(a, b), lpips_net(*up))

def test_lpips_weights_are_assembled_from_the_published_files(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(1)
    state = {k: torch.rand(v.shape, generator=g) / 10 for k, v in sf.lpips_network().state_dict().items()}
    state["lins.2.model.1.weight"] = state["lin2.model.1.weight"]  # the package's two names for one layer
    vgg = {f"features.{k.split('.', 2)[2]}": v for k, v in state.items() if k.startswith("net.")}  # torchvision's
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # vgg16-397923af.pth holds the classifier too
    lin = {k: v for k, v in state.items() if re.fullmatch(r"lin\d\.model\.1\.weight", k)}  # LPIPS v0.1's vgg.pth
    for name, part in (("vgg16-397923af.pth", vgg), ("vgg.pth", lin)):
        torch.save(part, tmp_path / name)
    monkeypatch.setattr(sf, "download", lambda url, *args: tmp_path / url.rsplit("/", 1)[1])
    for k in [k for k in state if k.startswith("lins.")]:
        state[k] = state[k.replace("lins.", "lin")]
    state.update({k: v for k, v in sf.lpips_network().state_dict().items() if k.startswith("scaling_layer.")})
    a, b = torch.rand(2, 3, 16, 16) * 2 - 1, torch.rand(2, 3, 16, 16) * 2 - 1
    up = [F.interpolate(x, size=64, mode="bilinear", align_corners=True) for x in (a, b)]
    cfg = sf.settings_for({"dataset": "shapes", "data_dir": str(tmp_path), "device": "cpu"}, "distill")
    with torch.no_grad():
        torch.testing.assert_close(sf.lpips_distance(cfg)(a, b), sf.lpips_network(state)(*up))

def test_lpips_weights_offline_is_a_one_line_error(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cfg = sf.settings_for({"dataset": "shapes", "data_dir": str(tmp_path), "distance": "lpips"}, "distill")
    with pytest.raises(sf.UsageError, match="put it at .*vgg16-397923af.pth, or pass --lpips-weights") as err:
        sf.lpips_distance(cfg)
    assert "\n" not in str(err.value)

def test_distill_with_lpips_trains_from_given_weights(tmp_path):
    argv = ["--dataset", "shapes", "--max-images", "32", "--teacher-model", "unet-micro", "--model", "unet-micro",
            "--steps", "2", "--batch-size", "4", "--num-pairs", "8", "--pairs-batch", "8", "--rtol", "1e-2",
            "--atol", "1e-2", "--preview-every", "0", "--out", str(tmp_path), "--data-dir", str(tmp_path / "data")]
    for stage in ("teacher", "pairs", "reflow"):
        assert sf.main([*argv, "--stage", stage]) == 0
    torch.save(sf.lpips_network().state_dict(), tmp_path / "lpips.pth")
    assert sf.main([*argv, "--stage", "distill", "--distance", "lpips", "--lpips-weights", str(tmp_path / "lpips.pth")]) == 0
    assert sf.read_checkpoint(tmp_path / "distill.pt")["step"] == 2


# ----------------------------------------------------------------------------- 16. Sampling and evaluation

@pytest.mark.parametrize("preset, conv_linear, total", [("slim-15.7m", 3.70e9, 3.90e9), ("slim-27.9m", 6.57e9, 6.89e9)])
def test_macs_of_the_official_students(preset, conv_linear, total):
    macs = sf.count_macs(sf.UNet(**sf.PRESETS[preset]).eval(), torch.randn(1, 3, 32, 32), torch.rand(1))
    assert macs["conv"] + macs["linear"] == pytest.approx(conv_linear, rel=0.01)
    assert macs["total"] == pytest.approx(total, rel=0.01)
    assert macs["total"] == macs["conv"] + macs["linear"] + macs["attention"]

def test_macs_of_an_mlp_are_its_weight_count_per_sample():
    net = sf.MLP(hidden=32, depth=2, temb_dim=16)
    weights = sum(m.weight.numel() for m in net.modules() if isinstance(m, torch.nn.Linear))
    assert sf.count_macs(net, torch.randn(5, 2), torch.rand(5)) == {"conv": 0, "linear": weights, "attention": 0,
                                                                    "total": weights}

def test_samples_never_reuse_the_noise_of_the_training_pairs(tmp_path):
    assert run(tmp_path, "--stage", "teacher") == 0
    assert run(tmp_path, "--stage", "pairs") == 0
    args = sf.parse_args(["--out", str(tmp_path), *TINY, "--stage", "sample", "--num-samples", "256"])
    noise, _ = sf.generate_all(lambda z: z, "distill", args)  # a generator that returns its noise
    z0 = torch.load(tmp_path / "pairs.pt", weights_only=True)["z0"]
    assert noise.shape == z0.shape and (noise - z0).abs().min() > 0
    assert torch.equal(noise, sf.generate_all(lambda z: z, "distill", args)[0])  # and is fixed by the seed

def test_eval_on_a_tiny_2d_run(tmp_path, capsys):
    assert run(tmp_path, "--stage", "teacher") == 0
    assert run(tmp_path, "--stage", "eval", "--sampler", "euler", "--nfe", "4") == 0
    row = json.loads((tmp_path / "metrics.json").read_text())["teacher (euler) nfe=4"]
    assert row["nfe"] == 4 and row["params"] == 8578 and row["flops"] == 2 * row["macs"] > 0
    assert row["sw2"] > 0 and row["sw2_floor"] > 0 and row["straightness"] > 0 and row["samples_per_s"] > 0
    assert "SW2 floor" in capsys.readouterr().out

def test_eval_on_shapes_with_an_injected_feature_extractor(tmp_path):
    argv = ["--dataset", "shapes", "--max-images", "48", "--teacher-model", "unet-micro", "--steps", "2",
            "--batch-size", "4", "--out", str(tmp_path), "--data-dir", str(tmp_path / "data")]
    assert sf.main([*argv, "--stage", "teacher"]) == 0
    extractor = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())  # 3·8·8 = 192 features
    args = sf.parse_args([*argv, "--stage", "eval", "--num-samples", "48", "--pairs-batch", "8", "--sampler", "euler",
                          "--nfe", "2"])
    row = sf.stage_eval(args, extractor=extractor)
    assert row["fid"] > 0 and row["swd"] > 0 and row["nfe"] == 2 and row["macs_with_attention"] > row["macs"] > 0
    assert len(list((tmp_path / "data").glob("fid_stats_shapes_train_32px_48_*.npz"))) == 1  # cached
    assert sf.stage_eval(args, extractor=extractor)["fid"] == pytest.approx(row["fid"], rel=1e-9)

def test_eval_without_fid_needs_no_weights_and_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sf, "download", never("a download"))
    argv = [*SHAPES, "--out", str(tmp_path), "--data-dir", str(tmp_path / "data")]
    assert sf.main([*argv, "--stage", "teacher"]) == 0
    capsys.readouterr()
    assert sf.main([*argv, "--stage", "eval", "--no-fid", "--sampler", "euler", "--nfe", "2"]) == 0
    out = capsys.readouterr().out
    row = json.loads((tmp_path / "metrics.json").read_text())["teacher (euler) nfe=2 no-fid"]  # beside a row with FID
    assert row["fid"] is None and "--no-fid" in row["fid_not_computed"] and row["swd"] > 0 and row["macs"] > 0
    assert row["straightness"] > 0 and row["samples_per_s"] > 0
    line = next(line for line in out.splitlines() if line.startswith("teacher (euler)"))
    assert line.split()[4] == "-" and float(line.split()[5]) == pytest.approx(row["swd"], abs=0.05)
    assert "FID not computed (--no-fid" in out and not list((tmp_path / "data").glob("fid*"))

def test_fid_sees_samples_as_8_bit_images_like_the_training_set(tmp_path):
    args = sf.parse_args(["--dataset", "shapes", "--max-images", "48", "--out", str(tmp_path), "--data-dir",
                          str(tmp_path / "data"), "--stage", "eval", "--pairs-batch", "16"])
    extractor = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())
    real = sf.to_unit_range(sf.image_dataset("shapes", args.data_dir, 32, 48, args.seed))
    fid = sf.fid_metric(args, extractor)
    assert fid(real + 0.0035) == pytest.approx(0, abs=1e-4)  # within the same 8-bit level
    assert fid(real + 0.01) > 1e-3
    assert fid(real - 0.0035) > 1e-3  # truncated, as the official code does: not rounded

def test_swd_is_zero_between_equal_sets_and_grows_with_the_difference(monkeypatch):
    real, held_out = sf.shapes_images(64, 32, seed=0), sf.shapes_images(64, 32, seed=1)
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert sf.laplacian_swd(real, real) == 0
    assert 0 < sf.laplacian_swd(real, held_out) < sf.laplacian_swd(real, noise)
    fine = sf.to_unit_range(real) + 0.2 * (torch.arange(32) % 2)  # stripes: only the finest level changes
    levels, sliced = [], sf.sliced_wasserstein
    monkeypatch.setattr(sf, "sliced_wasserstein", lambda a, b, **kw: levels.append(sliced(a, b, **kw)) or levels[-1])
    sf.laplacian_swd(real, fine)
    assert len(levels) == 2 and levels[0] > 0.1 and levels[1] < 0.01 * levels[0]  # 32x32, then 16x16

def test_fid_reads_given_training_set_statistics(tmp_path):
    argv = ["--dataset", "shapes", "--max-images", "48", "--out", str(tmp_path), "--data-dir", str(tmp_path / "data"),
            "--stage", "eval", "--pairs-batch", "16"]
    extractor = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())
    real = sf.to_unit_range(sf.image_dataset("shapes", tmp_path / "data", 32, 48, 0))
    fid = sf.fid_metric(sf.parse_args(argv), extractor)(real + 0.01)
    cached = next((tmp_path / "data").glob("fid_stats_*.npz"))
    shutil.move(cached, tmp_path / "given.npz")
    given = sf.parse_args([*argv, "--fid-stats", str(tmp_path / "given.npz")])
    assert sf.fid_metric(given, extractor)(real + 0.01) == fid
    assert not list((tmp_path / "data").glob("fid_stats_*.npz"))  # read from the file, not computed again
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(sf.UsageError, match="holds no FID statistics"):
        sf.fid_metric(sf.parse_args([*argv, "--fid-stats", str(tmp_path / "bad.npz")]), extractor)

def never(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} before the checks")
    return fail

def test_eval_checks_its_weights_and_statistics_before_sampling(tmp_path, capsys, monkeypatch):
    assert sf.main(["--out", str(tmp_path), *SHAPES, "--stage", "teacher"]) == 0
    monkeypatch.setattr(sf, "generate_all", never("sampled"))
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    capsys.readouterr()
    assert sf.main(["--out", str(tmp_path), *SHAPES, "--stage", "eval", "--data-dir", str(tmp_path / "d")]) == 2
    assert_one_line_error(capsys, "could not download the FID Inception weights")
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    assert sf.main(["--out", str(tmp_path), *SHAPES, "--stage", "eval", "--fid-weights",
                    str(tmp_path / "garbage.pt")]) == 2
    assert_one_line_error(capsys, f"{tmp_path / 'garbage.pt'} is corrupt or not a FID Inception weights file")
    torch.save(sf.fid_inception().state_dict(), tmp_path / "fid.pt")
    (tmp_path / "stats.npz").write_bytes(b"not an npz")
    assert sf.main(["--out", str(tmp_path), *SHAPES, "--stage", "eval", "--fid-weights", str(tmp_path / "fid.pt"),
                    "--fid-stats", str(tmp_path / "stats.npz")]) == 2
    assert_one_line_error(capsys, "holds no FID statistics")

def test_eval_reads_its_held_out_images_before_sampling(tmp_path, monkeypatch):
    import torchvision
    header = b"".join(n.to_bytes(4, "big") for n in (2051, 16, 28, 28))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + bytes(range(256)) * 49)  # no test set beside it
    argv = ["--out", str(tmp_path), "--dataset", "fashion_mnist", "--data-dir", str(tmp_path), "--steps", "2",
            "--batch-size", "4", "--teacher-model", "unet-micro", "--model", "unet-micro", "--preview-every", "0"]
    assert sf.main([*argv, "--stage", "teacher"]) == 0
    monkeypatch.setattr(sf, "generate_all", never("sampled"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", never("downloaded"))
    extractor = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())
    with pytest.raises(sf.UsageError, match="could not load fashion_mnist"):  # the test set, offline
        sf.stage_eval(sf.parse_args([*argv, "--stage", "eval", "--num-samples", "8"]), extractor=extractor)

def test_all_checks_given_checkpoints_and_weights_before_training(tmp_path, capsys, monkeypatch):
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    assert run(tmp_path / "a", "--init-ckpt", str(tmp_path / "garbage.pt")) == 2
    assert_one_line_error(capsys, "is corrupt or not a slimflow file")
    assert not (tmp_path / "a" / "teacher.pt").exists()
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    assert sf.main(["--out", str(tmp_path / "b"), *SHAPES, "--distance", "lpips", "--data-dir", str(tmp_path)]) == 2
    assert_one_line_error(capsys, "could not download the LPIPS weights")
    assert not (tmp_path / "b" / "teacher.pt").exists()

def test_sample_does_not_replace_samples_without_overwrite(tmp_path, capsys):
    assert run(tmp_path, "--stage", "teacher") == 0
    assert run(tmp_path, "--stage", "sample", "--sampler", "euler") == 0
    before = (tmp_path / "samples_teacher.npy").read_bytes()
    capsys.readouterr()
    assert run(tmp_path, "--stage", "sample", "--sampler", "one_step") == 2
    assert_one_line_error(capsys, "samples_teacher.npy exists; pass --overwrite")
    assert (tmp_path / "samples_teacher.npy").read_bytes() == before
    assert run(tmp_path, "--stage", "sample", "--sampler", "rk45", "--overwrite") == 0
    assert (tmp_path / "samples_teacher.npy").read_bytes() != before

def test_out_of_memory_in_sampling_names_the_flag(tmp_path, capsys, monkeypatch):
    assert run(tmp_path, "--stage", "teacher") == 0
    out_of_memory_from_call(sf.MLP, "forward", 1, monkeypatch)
    capsys.readouterr()
    assert run(tmp_path, "--stage", "sample") == 1
    assert_one_line_error(capsys, "out of memory on cpu: lower --pairs-batch")
    assert not list(tmp_path.glob("samples_*"))


# ----------------------------------------------------------------------------- 17. Bench

def synchronisations(out, steps):
    """How many times train() makes the host wait for the GPU, in CUDA's sync-debug mode."""
    data = sf.TrainingData(torch.randn(1000, 2), device="cuda")
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_toy_teacher(out, sf.RectifiedFlowLoss(), data, device="cuda", steps=steps)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_training_steps_do_not_wait_for_the_gpu(tmp_path):  # only logs, checkpoints and previews do
    assert 0 < synchronisations(tmp_path / "a", 3) == synchronisations(tmp_path / "b", 9)  # one log and save each

@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor on a CPU needs a C++ compiler")
def test_compiled_training_gives_eager_losses_from_one_graph_per_network(tmp_path, capsys):
    # --compile on the CPU (inductor, about 60 s cold on 2 cores): a tiny U-Net's teacher steps, then distillation's
    # steps with the generator and its frozen guide v2 compiled, give eager's losses to 1e-5, from one graph per
    # network (no recompilation after the first step: 20 teacher steps, 5 distillation ones) and no graph break
    from torch._dynamo.utils import counters

    def tiny_unet(seed):
        torch.manual_seed(seed)
        net = sf.UNet(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), dropout=0.0, image_size=8)
        with torch.no_grad():  # no zero-initialised output: a guide that moves its input
            for p in net.parameters():
                p.add_(torch.randn_like(p), alpha=0.05)
        return net
    torch._dynamo.reset()
    counters.clear()
    pairs = torch.randn(2, 16, 3, 8, 8)
    teacher, distill, rate = {}, {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        history = sf.History(tmp_path / str(compiled), "teacher")
        sf.train(tiny_unet(0), sf.RectifiedFlowLoss(), sf.TrainingData(sf.shapes_images(64, 8)), 20, 4, 1e-3,
                 compile=compiled, log_every=1, ckpt_every=10**9, history=history)
        teacher[compiled] = [history.rows[step]["loss"] for step in range(1, 21)]
        rate[compiled] = history.rows[4]["it/s"]
        history = sf.History(tmp_path / str(compiled), "distill")
        guide = sf.compile_if(tiny_unet(1), compiled)  # as stage_distill builds it
        objective = sf.FlowGuidedDistillationLoss(guide, sf.l2_distance, 1.0, "paper")  # v2 called twice a step
        sf.train(sf.OneStepGenerator(tiny_unet(2)), objective, sf.TrainingData(*pairs), 5, 4, 1e-3,
                 compile=compiled, log_every=1, ckpt_every=10**9, history=history)
        distill[compiled] = [(history.rows[step]["pair"], history.rows[step]["reg"]) for step in range(1, 6)]
    assert teacher[True] == pytest.approx(teacher[False], rel=1e-5) and len(set(teacher[True])) == 20
    assert all(a == pytest.approx(b, rel=1e-5) for a, b in zip(distill[True], distill[False]))
    assert len(set(distill[True])) == 5 and min(reg for pair, reg in distill[True]) > 1e-3  # the guide matters
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]  # teacher, generator, guide
    assert capsys.readouterr().out.count("[train] first step, compilation included: ") == 2  # its time, once a run
    assert rate[True] > rate[False] / 10  # the rate of the compiled steps, not of seconds of compilation

def test_every_network_that_compile_reaches_traces_into_one_graph():
    # what --compile compiles, traced by dynamo alone (no code generated: seconds): one graph each, no graph break
    unet, t, x = sf.build_model("unet-micro", (3, 32, 32)), torch.rand(2), torch.randn(2, 3, 32, 32)
    calls = {"U-Net, training": (unet.train(), x, t), "generator": (sf.OneStepGenerator(unet), x),
             "TraFlow's U-Net, sampling": (sf.build_model("unet-micro", (3, 32, 32), two_times=True).eval(), x, t, t),
             "MLP": (sf.build_model("mlp-64x2", (2,)), torch.randn(2, 2), t),
             "LPIPS at 64x64": (sf.lpips_at_64(sf.lpips_network()), x.clone().requires_grad_(), torch.randn_like(x)),
             "FID Inception": (sf.fid_inception(), x)}
    for name, (fn, *inputs) in calls.items():
        explained = torch._dynamo.explain(fn)(*inputs)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), (name, explained.break_reasons)

class Compiled(torch.nn.Module):  # stands in for torch.compile's module: runs fn, which it holds, and counts calls
    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, 0

    def forward(self, *args):
        self.calls += 1
        return self.fn(*args)

    @property
    def kind(self):
        return type(self.fn).__name__ if isinstance(self.fn, torch.nn.Module) else self.fn.__name__

def record_compiled(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn: compiled.append(Compiled(fn)) or compiled[-1])
    return compiled

def test_compile_reaches_every_network_a_stage_runs(tmp_path, monkeypatch):
    # --compile compiles what a stage trains and what it only runs: pairs' teacher; distillation's generator, its
    # guide v2 and LPIPS; the network that samples, FID's Inception. Without it nothing is compiled (stood in for
    # here, and counted: see the test above)
    compiled, resets = record_compiled(monkeypatch), []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(len(compiled)))
    argv = [*SHAPES, "--rtol", "1e-2", "--atol", "1e-2", "--out", str(tmp_path), "--device", "cpu"]
    torch.save(sf.lpips_network().state_dict(), tmp_path / "lpips.pth")
    lpips = ["--distance", "lpips", "--lpips-weights", str(tmp_path / "lpips.pth")]
    for stage, *extra in (["teacher"], ["pairs"], ["reflow"], ["distill", *lpips]):
        assert sf.main([*argv, "--stage", stage, *extra]) == 0 and compiled == [], stage
        assert sf.main([*argv, "--stage", stage, *extra, "--overwrite", "--compile"]) == 0, stage
        assert [c.kind for c in compiled] == {"teacher": ["UNet"], "pairs": ["UNet"], "reflow": ["UNet"],
                         "distill": ["distance", "UNet", "OneStepGenerator"]}[stage], stage
        assert all(c.calls > 0 for c in compiled), stage  # and what runs is the compiled one
        if stage in ("pairs", "distill"):  # the frozen network: teacher.pt's or reflow.pt's EMA
            frozen = next(c.fn for c in compiled if type(c.fn).__name__ == "UNet")
            assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
        compiled.clear()
    assert sf.main([*argv, "--stage", "sample", "--from", "reflow", "--sampler", "euler", "--nfe", "2",
                    "--compile"]) == 0  # the network that samples
    assert [c.kind for c in compiled] == ["UNet"] and compiled[0].calls == 4  # 2 batches of 4, 2 Euler steps each
    compiled.clear()
    extractor = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten())  # FID's Inception, as a stand-in
    cfg = sf.parse_args([*argv, "--stage", "eval", "--from", "distill", "--data-dir", str(tmp_path / "data"),
                         "--compile"])
    assert math.isfinite(sf.stage_eval(cfg, extractor=extractor)["fid"])
    assert [c.kind for c in compiled] == ["Sequential", "OneStepGenerator"] and all(c.calls for c in compiled)
    assert compiled[1].calls == 2 + 3  # the samples, in 2 batches; then samples/s, timed on a batch 3 times
    assert [f.name for f in (tmp_path / "data").glob("fid_stats_*")] == [
        "fid_stats_shapes_train_32px_16_sequential_tf1.npz"]  # named by the extractor, not by its compiled wrapper
    assert resets == [0] * 5  # each compiled stage run by main (eval was not) compiles afresh, before any network

def test_precision_defaults_to_fp32_without_a_bf16_gpu():
    assert sf.resolve_precision(None, "cpu") == "fp32" and sf.resolve_precision("bf16", "cpu") == "bf16"

def test_bf16_autocast_trains_on_the_cpu(tmp_path):
    assert run(tmp_path, "--stage", "teacher", "--precision", "bf16") == 0
    ckpt = torch.load(tmp_path / "teacher.pt", weights_only=True)
    assert ckpt["step"] == 20 and all(v.dtype == torch.float32 for v in ckpt["model"].values())  # fp32 master weights
    assert ckpt["training"]["precision"] == "bf16"

def test_bench_compares_student_and_teacher(tmp_path, capsys):
    rows = sf.stage_bench(sf.parse_args(["--stage", "bench", "--dataset", "shapes", "--model", "unet-micro",
                                         "--teacher-model", "unet-tiny", "--batch-size", "2",
                                         "--rtol", "1e-2", "--atol", "1e-2", "--out", str(tmp_path)]))
    precisions = dict.fromkeys(["fp32", sf.resolve_precision(None, sf.resolve_device("auto"))])  # bf16 on a GPU too
    assert [(r["model"], r["precision"], r["compiled"], r["layout"]) for r in rows] == [
        (model, precision, False, "NCHW") for model in ("unet-micro", "unet-tiny") for precision in precisions]
    assert rows[-1]["params"] > rows[0]["params"] and rows[-1]["macs"] > rows[0]["macs"]
    assert all(r["train"] > 0 and 0 < r["one_step_of_ceiling"] and r["rk45_nfe"] > 1 and r["rk45"] > 0 for r in rows)
    assert all((r["distill"] or 0) > 0 if r["model"] == "unet-micro" else r["distill"] is None for r in rows)  # student
    out = capsys.readouterr().out
    assert "matmul ceiling fp32" in out and "one-step sampling of unet-micro / RK45 sampling of unet-tiny" in out

def test_bench_estimates_the_recipe_in_device_hours_from_the_fastest_rates(capsys):
    cfg = sf.parse_args(["--stage", "bench", "--dataset", "cifar10", "--batch-size", "64"])  # the recipe's is 128
    student = dict(model="slim-15.7m", precision="fp32", distill=320.0, rk45=1.0)
    teacher = dict(model="rf-61.8m", precision="fp32", distill=None)
    rows = [{**student, "train": 800.0}, {**student, "train": 1600.0, "distill": 640.0},  # samples/s
            {**teacher, "train": 800.0, "rk45": 50.0}, {**teacher, "train": 400.0, "rk45": 25.0},
            {**teacher, "precision": "bf16", "train": 100.0, "rk45": 500.0}]  # the pairs stage runs in fp32
    hours = sf.recipe_hours(cfg, rows)
    assert hours == pytest.approx({"pairs": 50_000 / 50 / 3600, "reflow": 500_000 * 128 / 1600 / 3600,
                                   "distill": 200_000 * 128 / 640 / 3600, "teacher": 800_000 * 128 / 800 / 3600})
    assert ("pairs 16m40s (50,000 by RK45), reflow 11h06m (500,000 steps), distill 11h06m (200,000 steps): 22h30m "
            "from a given teacher; training the teacher (800,000 steps) adds 35h33m. Timed with batch 64 (the "
            "recipe's 128), RK45 batch 64 (the recipe's 500)\n") in capsys.readouterr().out
    cfg = sf.parse_args(["--stage", "bench", "--dataset", "cifar10", "--batch-size", "500", "--distance", "l2",
                         "--rtol", "1e-2", "--target-form", "paper"])
    sf.recipe_hours(cfg, rows)
    assert capsys.readouterr().out.endswith(
        "Timed with batch 500 (the recipe's 128), rtol 0.01 (the recipe's 1e-05), distance l2 (the recipe's lpips), "
        "target form paper (the recipe's official)\n")

def test_bench_with_compile_compiles_every_network_it_times(tmp_path, monkeypatch):
    compiled = record_compiled(monkeypatch)  # stood in for: see Compiled
    rows = sf.stage_bench(sf.parse_args(["--stage", "bench", "--dataset", "shapes", "--model", "unet-micro",
                                         "--teacher-model", "unet-tiny", "--batch-size", "2", "--precision", "fp32",
                                         "--compile", "--distance", "lpips", "--rtol", "1e-2", "--atol", "1e-2",
                                         "--out", str(tmp_path)]))
    assert [(r["model"], r["compiled"]) for r in rows] == [(m, c) for m in ("unet-micro", "unet-tiny") for c in (0, 1)]
    # the compiled student: sampling, distillation's LPIPS, guide and generator, training; the teacher: two of them
    assert [c.kind for c in compiled] == ["UNet", "distance", "UNet", "OneStepGenerator", "UNet", "UNet", "UNet"]
    assert all(c.calls > 0 for c in compiled)

def test_bench_with_channels_last_measures_both_layouts(tmp_path):
    rows = sf.stage_bench(sf.parse_args(["--stage", "bench", "--dataset", "shapes", "--model", "unet-micro",
                                         "--teacher-model", "unet-micro", "--batch-size", "2", "--precision", "fp32",
                                         "--channels-last", "--rtol", "1e-2", "--atol", "1e-2", "--out", str(tmp_path)]))
    assert [r["layout"] for r in rows] == ["NCHW", "NHWC"] and all(r["train"] > 0 and r["one_step"] > 0 for r in rows)


# ----------------------------------------------------------------------------- 18. Settings and the command line

@pytest.mark.parametrize("argv, pattern", [
    (["--dataset", "nope"], "invalid choice: 'nope'"),
    (["--stage", "nope"], "invalid choice: 'nope'"),
    (["--steps", "0"], "must be a positive integer"),
    (["--batch-size", "-4"], "must be a positive integer"),
    (["--lr", "0"], "must be positive"),
    (["--num-pairs", "0"], "must be a positive integer"),
    (["--image-size", "-1"], "must be a positive integer"),
    (["--device", "nope"], "device 'nope'"),
    (["--ema-decay", "1.0"], "--ema-decay: must be in [0, 1), got 1.0"),
    (["--ema-decay", "1.5"], "--ema-decay: must be in [0, 1)"),
    (["--ema-decay", "nan"], "--ema-decay: must be in [0, 1)"),
    (["--lr", "inf"], "--lr: must be positive and finite, got inf"),
    (["--weight-decay", "nan"], "--weight-decay: must be >= 0 and finite"),
    (["--rtol", "inf"], "--rtol: must be positive and finite"),
    (["--reg-weight", "inf"], "--reg-weight: must be >= 0 and finite"),
    (["--seed", "-1"], "--seed: must be in [0, 4294967296), got -1"),
    (["--seed", str(2**70)], "--seed: must be in [0, 4294967296)"),
    (["--dataset", "shapes", "--image-size", "17"], "--image-size 17: unet-tiny needs a multiple of 2, at least 8"),
    (["--dataset", "shapes", "--image-size", "7"], "--image-size 7: unet-tiny needs a multiple of 2, at least 8"),
    (["--dataset", "cifar10", "--image-size", "20"], "--image-size 20: rf-61.8m needs a multiple of 8"),
    (["--model", "slim-3.4m"], "--model slim-3.4m does not fit toy data; choose from mlp-256x3"),
    (["--dataset", "shapes", "--teacher-model", "mlp-64x2"], "--teacher-model mlp-64x2 does not fit image data"),
    (["--resume", "--overwrite"], "--resume continues a stage and --overwrite starts it over"),
    (["--stage", "traflow", "--channels-last"], "--channels-last: TraFlow's forward-mode derivative fails through"),
    (["--stage", "traflow", "--compile"], "--compile: torch.compile cannot trace TraFlow's forward-mode derivative"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, pattern):
    assert sf.main(["--out", str(tmp_path), *argv]) == 2
    assert_one_line_error(capsys, pattern)
    assert not any(tmp_path.iterdir())

def test_the_command_line_exits_with_status_2_and_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(HERE / "slimflow.py"), "--out", str(tmp_path), "--steps", "-3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stdout == ""

def test_cifar10_defaults_are_the_official_recipe():
    teacher, reflow, distill = (sf.settings_for({"dataset": "cifar10"}, s) for s in ("teacher", "reflow", "distill"))
    for cfg in (teacher, reflow):  # configs/rectified_flow/cifar10_rf_gaussian.py
        assert (cfg.flip, cfg.lr_warmup, cfg.lr, cfg.batch_size, cfg.ema_decay) == (True, 5000, 2e-4, 128, 0.999999)
    # train.py when fine-tuning a pre-trained model: no warm-up, no flips; reflow/reflow.py: LPIPS
    assert (distill.flip, distill.lr_warmup, distill.ema_decay, distill.distance) == (False, 0, 0.999999, "lpips")
    assert sf.settings_for({"dataset": "fashion_mnist"}, "distill").distance == "lpips"
    for dataset in ("shapes", "8gaussians"):  # CPU demos and tests need no downloads
        assert sf.settings_for({"dataset": dataset}, "distill").distance == "l2"
    assert sf.settings_for({"dataset": "cifar10", "flip": True, "lr_warmup": 7}, "distill").flip is True

def test_a_second_run_on_a_run_directory_in_use_is_refused_naming_the_first(tmp_path, capsys):
    import fcntl
    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "a+") as lock:  # another run holds the directory
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("4242")
        lock.flush()
        assert run(tmp_path, "--stage", "teacher") == 2
        assert_one_line_error(capsys, f"{tmp_path} is in use by another slimflow run (process 4242)")
        assert not (tmp_path / "teacher.pt").exists()
    assert run(tmp_path, "--stage", "teacher") == 0  # the lock goes with the run that held it
    assert run(tmp_path, "--stage", "pairs") == 0  # and this run's lock with this run


# ----------------------------------------------------------------------------- the notebook

def test_the_toy_notebook_runs_top_to_bottom_in_its_quick_setting(tmp_path, monkeypatch):
    """toy_2d.ipynb as the reader runs it: every code cell in order, in one namespace, with
    SLIMFLOW_QUICK=1 (tenfold fewer steps and samples). It writes no file."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setenv("SLIMFLOW_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(HERE))  # `import slimflow` as from the repository
    cells = json.loads((HERE / "toy_2d.ipynb").read_text(encoding="utf-8"))["cells"]
    namespace = {"__name__": "__main__"}
    with matplotlib.rc_context():  # the notebook's rcParams do not leak into other tests
        for i, cell in enumerate(cells):
            if cell["cell_type"] != "code":
                continue
            try:
                exec(compile("".join(cell["source"]), f"toy_2d.ipynb cell {i}", "exec"), namespace)
            except Exception as err:
                raise AssertionError(f"toy_2d.ipynb: code cell {i} raised {type(err).__name__}: {err}") from err
            finally:
                plt.close("all")
    assert namespace["QUICK"] and namespace["RESULTS"], "the notebook ran without its quick setting or table"
    assert not list(tmp_path.iterdir()), "the notebook wrote files where it runs"
