"""SlimFlow in one file: small one-step generators trained with rectified flow.

SlimFlow (Zhu, Liu & Liu, ECCV 2024) compresses a diffusion model in two directions at
once: one sampling step, and fewer parameters. The pipeline, in the order it runs:

    teacher   a 1-rectified flow v1 learns to carry noise Z0 to data
    pairs     the teacher's ODE couples each Z0 to a data point Z1
    reflow    Annealing Reflow: a *small* 2-rectified flow v2 learns the straightened coupling
    distill   Flow-Guided Distillation: the one-step generator G(z) = z + u(z, eps)
    traflow   (an alternative to distill) TraFlow: one network jumping in 1, 2 or N steps

Part I is the method, in that order; Part II the machinery (image files, checkpoints, several GPUs, evaluation,
the command line). `python slimflow.py` runs the whole pipeline on a 2-D toy on a CPU in under a minute;
`python slimflow.py --dataset cifar10 --stage distill` runs one stage of the paper's recipe, and
`torchrun --nproc_per_node N slimflow.py ...` runs a stage on N GPUs.
"""

import argparse
import copy
import gzip
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
import types
try:
    import fcntl  # the run directory's lock (see lock_run_directory); Windows runs without it
except ImportError:
    fcntl = None
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn  # noqa: F401 -- before any process group exists: see start_processes
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import scipy.linalg
from scipy.integrate import solve_ivp

EPS = 1e-3  # the ODE's start time and the smallest training time

class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2, nothing overwritten."""

class TrainingError(Exception):
    """Training or solving cannot go on (a NaN loss or velocity): one line, exit status 1."""


# =============================================================================
# PART I: THE METHOD
# Everything needed to learn SlimFlow, in pipeline order; the names it borrows from the machinery say what they do.
# =============================================================================

# 1. Noise and data -----------------------------------------------------------
# Noise X0 ~ N(0, I) sits at t = 0 and data X1 at t = 1: images in [-1, 1], read by the machinery, or a 2-D toy.

TOY_DATASETS = ("8gaussians", "moons", "checkerboard", "spirals")

def toy_data(name, n, seed=0):
    """n points of a 2-D toy distribution as a float tensor (n, 2); same seed, same points."""
    rng = np.random.default_rng(seed)
    if name == "8gaussians":  # 8 modes on a circle of radius 2.83, std 0.35
        angles = rng.integers(0, 8, n) * (np.pi / 4)
        x = (4 * np.stack([np.cos(angles), np.sin(angles)], 1) + 0.5 * rng.standard_normal((n, 2))) / 1.414
    elif name == "moons":  # two interleaved half circles, centred and scaled to about [-3, 3]
        theta, upper = rng.uniform(0, np.pi, n), rng.integers(0, 2, n).astype(bool)
        x = np.where(upper[:, None], np.stack([np.cos(theta), np.sin(theta)], 1),
                     np.stack([1 - np.cos(theta), 0.5 - np.sin(theta)], 1))
        x = 2 * (x - [0.5, 0.25]) + 0.1 * rng.standard_normal((n, 2))
    elif name == "checkerboard":  # uniform on 8 squares of a 4x4 board over [-4, 4]^2
        x1 = rng.uniform(-2, 2, n)
        x = 2 * np.stack([x1, rng.uniform(0, 1, n) - 2 * rng.integers(0, 2, n) + np.floor(x1) % 2], 1)
    elif name == "spirals":  # two interleaved spirals
        r = np.sqrt(rng.uniform(0, 1, n)) * 3 * np.pi
        sign = np.where(rng.integers(0, 2, n) == 1, 1.0, -1.0)[:, None]
        x = sign * np.stack([-np.cos(r) * r, np.sin(r) * r], 1) / 3 + 0.1 * rng.standard_normal((n, 2))
    else:
        raise UsageError(f"unknown toy dataset {name!r}; choose from {', '.join(TOY_DATASETS)}")
    return torch.from_numpy(x).float()


# 2. Networks -----------------------------------------------------------------
# A velocity field v(x, t), t of shape (batch,). The U-Net is the official code's DDPM++ block for block (so its
# sizes and checkpoints carry over: PRESETS, below); it embeds 999·t, DDPM's embedding being for integer steps.

def time_embedding(t, dim, scale=999.0, max_period=10_000):
    """Sinusoidal embedding of scale·t: first half sines, second half cosines, in at least float32."""
    t = t.to(torch.promote_types(t.dtype, torch.float32))
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=t.dtype) / (half - 1))
    args = scale * t[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)

class MLP(nn.Module):
    """Velocity field for 2-D toys: an MLP on (x, embedding of 10·t); RK45 takes ~50 steps on it, ~400 with 999·t."""

    def __init__(self, dim=2, hidden=256, depth=3, temb_dim=64, time_scale=10.0, two_times=False):
        super().__init__()
        self.temb_dim, self.time_scale = temb_dim, time_scale
        widths = [dim + temb_dim] + [hidden] * depth
        layers = [m for w_in, w_out in zip(widths, widths[1:]) for m in (nn.Linear(w_in, w_out), nn.SiLU())]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, dim))
        self.s_proj = nn.Linear(temb_dim, hidden, bias=False) if two_times else None  # TraFlow's second time s

    def forward(self, x, t, s=None):
        h = self.net[0](torch.cat([x, time_embedding(t, self.temb_dim, self.time_scale)], dim=1))
        if s is not None:
            h = h + self.s_proj(time_embedding(s, self.temb_dim, self.time_scale))
        return self.net[1:](h)

def group_norm(ch):
    return nn.GroupNorm(min(ch // 4, 32), ch, eps=1e-6)

def conv(ch_in, ch_out, kernel=3, zero=False, scale=1.0):
    """Convolution initialised as the official code: Xavier uniform of variance × scale, zero bias;
    zero=True for output convolutions, so that every residual block starts as the identity."""
    layer = nn.Conv2d(ch_in, ch_out, kernel, padding=kernel // 2)
    nn.init.zeros_(layer.weight) if zero else nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(scale))
    nn.init.zeros_(layer.bias)
    return layer

class ResBlock(nn.Module):
    """BigGAN-type residual block: time-conditioned, optionally resampling 2x up or down."""

    def __init__(self, ch_in, ch_out, temb_ch, dropout, resample=None):
        super().__init__()
        self.resample = {"up": nn.Upsample(scale_factor=2.0), "down": nn.AvgPool2d(2), None: nn.Identity()}[resample]
        self.norm1, self.conv1 = group_norm(ch_in), conv(ch_in, ch_out)
        self.temb_proj = nn.Linear(temb_ch, ch_out)
        nn.init.xavier_uniform_(self.temb_proj.weight), nn.init.zeros_(self.temb_proj.bias)
        self.norm2, self.dropout = group_norm(ch_out), nn.Dropout(dropout)
        self.conv2 = conv(ch_out, ch_out, zero=True)
        self.shortcut = conv(ch_in, ch_out, 1) if ch_in != ch_out or resample else nn.Identity()

    def forward(self, x, temb):
        h = F.silu(self.norm1(x))
        h, x = self.resample(h), self.resample(x)  # the block's path and its skip alike
        h = self.conv1(h) + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.shortcut(x) + h) / math.sqrt(2)  # rescaled skip keeps the variance of deep stacks at 1

class Attention(nn.Module):
    """Self-attention over all positions, single head; the residual is rescaled by 1/√2."""

    def __init__(self, ch):
        super().__init__()
        self.norm = group_norm(ch)
        self.q, self.k, self.v = (conv(ch, ch, 1, scale=0.1) for _ in range(3))
        self.proj = conv(ch, ch, 1, zero=True)

    def forward(self, x, temb=None):
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2) for m in (self.q, self.k, self.v))  # (b, hw, c)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q·kᵀ/√c)·v
        h = self.proj(h.transpose(1, 2).reshape(b, c, hh, ww))
        return (x + h) / math.sqrt(2)

class UNet(nn.Module):
    """DDPM++ U-Net: level i has nf·ch_mult[i] channels, attention at attn_resolutions, modules in the order of the
    official `all_modules`; the down path saves skip connections, the up path concatenates them."""

    def __init__(self, nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
                 dropout=0.15, image_size=32, in_ch=3, two_times=False):
        super().__init__()
        self.nf, temb_ch = nf, 4 * nf
        self.time_mlp = nn.Sequential(nn.Linear(nf, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        for layer in self.time_mlp[::2]:
            nn.init.xavier_uniform_(layer.weight), nn.init.zeros_(layer.bias)
        self.s_mlp = copy.deepcopy(self.time_mlp) if two_times else None  # TraFlow's time s, embedded like t
        self.input_conv = conv(in_ch, nf)
        # skips[i]: block i saves its output ("push"), concatenates the last saved one to its input ("pop") or neither
        blocks, skips = [], {}
        skip_chs, ch, res = [nf], nf, image_size  # the input conv's output is the first skip
        for level, mult in enumerate(ch_mult):  # down path
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, nf * mult, temb_ch, dropout))
                ch = nf * mult
                if res in attn_resolutions:
                    blocks.append(Attention(ch))
                skips[len(blocks) - 1] = "push"  # the output of the resblock, or of its attention
                skip_chs.append(ch)
            if level != len(ch_mult) - 1:
                blocks.append(ResBlock(ch, ch, temb_ch, dropout, resample="down"))
                skips[len(blocks) - 1] = "push"
                skip_chs.append(ch)
                res //= 2
        blocks += [ResBlock(ch, ch, temb_ch, dropout), Attention(ch), ResBlock(ch, ch, temb_ch, dropout)]  # middle
        for level, mult in reversed(list(enumerate(ch_mult))):  # up path
            for _ in range(num_res_blocks + 1):
                skips[len(blocks)] = "pop"
                blocks.append(ResBlock(ch + skip_chs.pop(), nf * mult, temb_ch, dropout))
                ch = nf * mult
            if res in attn_resolutions:
                blocks.append(Attention(ch))
            if level != 0:
                blocks.append(ResBlock(ch, ch, temb_ch, dropout, resample="up"))
                res *= 2
        self.blocks, self.skips = nn.ModuleList(blocks), tuple(skips.get(i) for i in range(len(blocks)))
        self.out_norm, self.out_conv = group_norm(ch), conv(ch, in_ch, zero=True)

    def forward(self, x, t, s=None):
        temb = self.time_mlp(time_embedding(t, self.nf))
        if s is not None:
            temb = temb + self.s_mlp(time_embedding(s, self.nf))
        h = self.input_conv(x)
        skips = [h]
        for block, skip in zip(self.blocks, self.skips):
            if skip == "pop":
                h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, temb)
            if skip == "push":
                skips.append(h)
        return self.out_conv(F.silu(self.out_norm(h)))

class OneStepGenerator(nn.Module):
    """The SlimFlow generator G(z) = z + u(z, eps), u of the 2-rectified flow's architecture, from its weights."""

    def __init__(self, net):
        super().__init__()
        self.net = net  # u

    def forward(self, z):
        return z + self.net(z, time_like(z, EPS))


# The sizes by name: the official CIFAR10 U-Nets, the 61.8M teacher and SlimFlow's students, and tiny ones for CPUs.
# The 15.7M student is the teacher slimmed three ways: 96 channels instead of 128 (nf), three levels instead of four
# (ch_mult), two residual blocks per level instead of four: a quarter of the parameters, a third of the MACs per image.
PRESETS = {
    "rf-61.8m": dict(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4),
    "slim-27.9m": dict(nf=128, ch_mult=(1, 2, 2), num_res_blocks=2),
    "slim-15.7m": dict(nf=96, ch_mult=(1, 2, 2), num_res_blocks=2),
    "slim-7.0m": dict(nf=64, ch_mult=(1, 2, 2), num_res_blocks=2),
    "slim-3.4m": dict(nf=64, ch_mult=(1, 1, 2), num_res_blocks=1),
    "unet-tiny": dict(nf=32, ch_mult=(1, 2), num_res_blocks=1, dropout=0.0),
    "unet-micro": dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, dropout=0.0),
}
MLP_PRESETS = {"mlp-256x3": dict(hidden=256, depth=3), "mlp-128x3": dict(hidden=128, depth=3),  # toy networks
               "mlp-96x3": dict(hidden=96, depth=3), "mlp-64x2": dict(hidden=64, depth=2),
               "mlp-32x2": dict(hidden=32, depth=2)}

def build_model(name, data_shape, two_times=False):
    """A network from a preset name for data of shape (2,) or (c, h, w)."""
    if name in MLP_PRESETS and len(data_shape) == 1:
        return MLP(dim=data_shape[0], **MLP_PRESETS[name], two_times=two_times)
    if name in PRESETS and len(data_shape) == 3:
        return UNet(**PRESETS[name], in_ch=data_shape[0], image_size=data_shape[-1], two_times=two_times)
    kind, names = ("toy", MLP_PRESETS) if len(data_shape) == 1 else ("image", PRESETS)
    raise UsageError(f"model {name!r} does not fit {kind} data; choose from {', '.join(names)}")

def num_params(model):
    return sum(p.numel() for p in model.parameters())


# 3. Rectified flow and its samplers ------------------------------------------
# X_t = t·X1 + (1 - t)·X0, target velocity X1 - X0, t ~ U[eps, 1]. Samplers solve dZ/dt = v(Z, t) from
# t = eps to 1 and return (samples, NFE), plus the trajectory (steps + 1, *z.shape) when asked.

def broadcast_time(t, x):
    return t.view(-1, *[1] * (x.dim() - 1))

def interpolate(x0, x1, t):
    t = broadcast_time(t, x1)
    return t * x1 + (1 - t) * x0

def sample_time(x):
    """One training time per example of x, uniform on [eps, 1]."""
    return EPS + (1 - EPS) * torch.rand(len(x), device=x.device, dtype=x.dtype)

def time_like(x, t):
    """The time t once per example of x: the (batch,) tensor that every network takes."""
    return torch.full((len(x),), float(t), device=x.device, dtype=x.dtype)

@torch.no_grad()
def euler_sample(velocity, z, n=1, eps=EPS, trajectory=False):
    """N uniform Euler steps; NFE = N."""
    h, x, path = (1 - eps) / n, z, [z]
    for i in range(n):
        x = x + h * velocity(x, time_like(x, eps + i * h))
        path.append(x)
    return (x, n, torch.stack(path)) if trajectory else (x, n)

@torch.no_grad()
def one_step_sample(velocity, z, eps=EPS, trajectory=False):
    """X1 ≈ X0 + (1 - eps)·v(X0, eps): exact when the flow's paths are straight."""
    return euler_sample(velocity, z, 1, eps, trajectory)

@torch.no_grad()
def heun_sample(velocity, z, n=1, eps=EPS, trajectory=False):
    """N Heun (trapezoidal) steps, the last one plain Euler: NFE = 2N - 1."""
    h, x, path = (1 - eps) / n, z, [z]
    for i in range(n):
        t = eps + i * h
        d = velocity(x, time_like(x, t))
        if i < n - 1:
            d = (d + velocity(x + h * d, time_like(x, t + h))) / 2
        x = x + h * d
        path.append(x)
    return (x, 2 * n - 1, torch.stack(path)) if trajectory else (x, 2 * n - 1)

@torch.no_grad()
def rk45_sample(velocity, z, eps=EPS, rtol=1e-5, atol=1e-5, trajectory=False):
    """Adaptive Dormand-Prince RK45 of scipy on the flattened batch, in float64 on the host (the official
    sampler of teachers and 2-rectified flows); NFE = the solver's function calls."""
    def f(t, y):
        x = torch.from_numpy(y).reshape(z.shape).to(z.device, z.dtype)
        v = velocity(x, time_like(x, t)).double().cpu().numpy().reshape(-1)
        if not np.isfinite(v).all():  # scipy may never return from a NaN
            raise TrainingError(f"RK45: the velocity is not finite at t = {t:.4f}; is the network diverged?")
        return v

    sol = solve_ivp(f, (eps, 1), z.double().cpu().numpy().reshape(-1), method="RK45", rtol=rtol, atol=atol)
    if not sol.success:
        raise TrainingError(f"RK45 failed: {sol.message}")
    path = torch.from_numpy(sol.y.T).reshape(-1, *z.shape).to(z.device, z.dtype)
    x = path[-1].clone()  # not a view: saved alone, it does not carry the whole path
    return (x, sol.nfev, path) if trajectory else (x, sol.nfev)

SAMPLERS = ("one_step", "euler", "heun", "rk45")

def sample_with(velocity, z, sampler, nfe=1, rtol=1e-5, atol=1e-5):
    """Dispatch by name; nfe is the budget of the fixed-step samplers."""
    return {"one_step": lambda: one_step_sample(velocity, z), "euler": lambda: euler_sample(velocity, z, nfe),
            "heun": lambda: heun_sample(velocity, z, (nfe + 1) // 2),
            "rk45": lambda: rk45_sample(velocity, z, rtol=rtol, atol=atol)}[sampler]()


# 4. The objectives -----------------------------------------------------------
# One small class per objective, as in EDM's loss.py: objective(net, batch, step) -> (loss, logs); logs stay
# tensors on the device until printed, so that no training step waits for the host.

def velocity_loss(net, x0, x1):
    """‖(X1 - X0) - v(X_t, t)‖², averaged, with t ~ U[eps, 1]."""
    t = sample_time(x1)
    return (net(interpolate(x0, x1, t), t) - (x1 - x0)).square().mean()

class RectifiedFlowLoss:  # the teacher's objective: noise and data paired at random
    def __call__(self, net, x1, step):
        return velocity_loss(net, torch.randn_like(x1), x1), {}

BETA_SCHEDULES = ("linear", "cosine", "exponential")

def annealing_beta(k, K, schedule="linear"):
    """β(k): 1 at step k = 0 (independent noise), falling towards 0 (pure reflow): linear and cosine reach 0 at
    k = K, exponential is exp(-k/K) (0.37 at K). K = 0: plain reflow."""
    if K <= 0:
        return 0.0
    r = min(1.0, k / K)
    betas = {"linear": 1.0 - r, "cosine": (1.0 + math.cos(math.pi * r)) / 2, "exponential": math.exp(-k / K)}
    if schedule not in betas:
        raise UsageError(f"unknown beta schedule {schedule!r}; choose {', '.join(BETA_SCHEDULES)}")
    return betas[schedule]

def mix_noise(z0, beta):
    """X0^β = sqrt(1 - β²)·Z0 + β·ε: still exactly N(0, I) when Z0 is."""
    return math.sqrt(1 - beta**2) * z0 + beta * torch.randn_like(z0)

class AnnealingReflowLoss:
    """Reflow on (Z0, Z1), Z0 mixed with fresh noise by β(k): the student learns data first, then the coupling."""

    def __init__(self, K, schedule="linear"):
        self.K, self.schedule = K, schedule

    def __call__(self, net, pair, step):
        z0, z1 = pair
        beta = annealing_beta(step, self.K, self.schedule)
        return velocity_loss(net, mix_noise(z0, beta), z1), {"beta": beta}

def l2_distance(a, b):
    return (a - b).square().flatten(1).mean(1)

def pseudo_huber_distance(a, b):
    """sqrt(‖a - b‖² + c²) - c, c = 0.00054·sqrt(d) as in improved consistency training: L2 near 0, L1 far."""
    c = 0.00054 * math.sqrt(a[0].numel())
    return ((a - b).square().flatten(1).sum(1) + c**2).sqrt() - c

DISTANCES = {"l2": l2_distance, "huber": pseudo_huber_distance}

TARGET_FORMS = ("official", "paper")  # the regularization target's first Euler step: along u, or along v2

class FlowGuidedDistillationLoss:
    """Flow-Guided Distillation of the generator G(z) = z + u(z, eps), guided by the frozen 2-rectified flow v2:
        L = D(G(Z0), Z1) + λ·D(G(z), target(z))        on the stored pairs, and on fresh noise z ~ N(0, I)
    target(z), under stop-gradient, is v2's ODE from z in two Euler steps split at t' ~ U(0.2, 0.8): the
    2-rectified-flow regularization, which teaches G on noise that no stored pair covers. λ = 0: naive distillation."""

    def __init__(self, v2, distance=l2_distance, reg_weight=1.0, target_form="official"):
        self.v2 = v2.eval().requires_grad_(False)
        self.distance, self.reg_weight, self.target_form = distance, reg_weight, target_form

    def __call__(self, G, pair, step):
        z0, z1 = pair
        pair_loss = self.distance(G(z0), z1).mean()
        if self.reg_weight == 0:
            return pair_loss, {"pair": pair_loss.detach()}
        z = torch.randn_like(z0)
        x = G(z)
        u = (x - z).detach()  # u(z, eps), as G(z) = z + u(z, eps)
        with torch.no_grad():  # the target, under stop-gradient
            t_prime = 0.2 + 0.6 * torch.rand(len(z), device=z.device)
            w = self.v2(z, time_like(z, EPS)) if self.target_form == "paper" else u  # the first step's velocity
            x_prime = z + broadcast_time(t_prime, z) * w  # x' = z + t'·w
            target = x_prime + broadcast_time(1 - t_prime, z) * self.v2(x_prime, t_prime)  # x' + (1 - t')·v2(x', t')
        reg_loss = self.distance(x, target).mean()
        return pair_loss + self.reg_weight * reg_loss, {"pair": pair_loss.detach(), "reg": reg_loss.detach()}


# 5. TraFlow: trajectory distillation -----------------------------------------
# One network G_θ(x_t, t, s) (a U-Net with a second time input, not SlimFlow's generator) moves a state from time t
# to any s ≥ t:
#     g(x_t, t, s) = x_t + (s - t)·G_θ(x_t, t, s)          (so g(x, t, t) = x)
# so that 1, 2 or N calls of the same network generate. Its targets, from a pre-trained flow v:
#     output        g(Z0, eps, 1) = Z1 on the teacher's pairs (RMSE of each pair, averaged)
#     velocity      ∂g(x_t, t, s)/∂s = v(g(x_t, t, s), s), by forward-mode AD in s
#     consistency   g(x_t, t, 1) = g(x_r, r, 1) for t < r < 1, the target under stop-gradient

def traflow_map(model, x, t, s):
    """g(x_t, t, s): the state at time s reached from x at time t in one call."""
    return x + broadcast_time(s - t, x) * model(x, t, s)

@torch.no_grad()
def traflow_sample(model, z, steps=1, eps=EPS):
    """`steps` jumps of g along a uniform grid from eps to 1; NFE = steps."""
    grid, x = [eps + (1 - eps) * i / steps for i in range(steps + 1)], z
    for t, s in zip(grid, grid[1:]):
        x = traflow_map(model, x, time_like(x, t), time_like(x, s))
    return x, steps

TRAFLOW_MIDPOINTS = ("student", "teacher")  # where the consistency midpoint x_r comes from

class TraFlowLoss:
    """L = L_out + λ_v·L_vel + λ_c·L_cons on teacher pairs. phase_steps = K > 0: the first K steps train consistency
    alone, the rest output + velocity (the paper's two phases). The consistency midpoint x_r comes from the student or
    one teacher Euler step; the target from the student under stop-gradient, or from `ema`, a network that train()
    keeps as the student's EMA."""

    def __init__(self, teacher, lambda_vel=1.0, lambda_cons=1.0, phase_steps=0, midpoint="student", ema=None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.lambda_vel, self.lambda_cons, self.phase_steps = lambda_vel, lambda_cons, phase_steps
        self.midpoint, self.ema = midpoint, ema

    def __call__(self, model, pair, step):
        z0, z1 = pair
        t = sample_time(z0)
        x_t, end = interpolate(z0, z1, t), torch.ones_like(t)  # end: the time 1
        losses = {}
        if self.phase_steps == 0 or step >= self.phase_steps:
            losses["out"] = l2_distance(traflow_map(model, z0, time_like(z0, EPS), end), z1).sqrt().mean()
            s = t + (1 - t) * torch.rand_like(t)  # a time in (t, 1)
            # The velocity term runs in float32, also under bf16 autocast: forward-mode AD does not follow
            # autocast's casts (a convolution meets bf16 weights with a float32 tangent), and bf16's 8-bit
            # mantissa would carry ∂g/∂s too coarsely for a residual that training drives towards 0.
            # The fused attention kernels have no forward-mode AD: attention runs as plain matrix products.
            with torch.autocast(x_t.device.type, enabled=False), sdpa_kernel(SDPBackend.MATH):
                g, dg_ds = torch.func.jvp(lambda s_: traflow_map(model, x_t, t, s_), (s,), (torch.ones_like(s),))
                v = self.teacher(g.detach(), s)  # the target, under stop-gradient
            losses["vel"] = self.lambda_vel * (dg_ds - v).square().mean()
        if self.phase_steps == 0 or step < self.phase_steps:
            r = t + (1 - t) * torch.rand_like(t)  # a time in (t, 1)
            with torch.no_grad():
                x_r = (traflow_map(model, x_t, t, r) if self.midpoint == "student"
                       else x_t + broadcast_time(r - t, x_t) * self.teacher(x_t, t))
                target = traflow_map(model if self.ema is None else self.ema, x_r, r, end)
            losses["cons"] = self.lambda_cons * (traflow_map(model, x_t, t, end) - target).square().mean()
        return sum(losses.values()), {k: v.detach() for k, v in losses.items()}


# 6. Measuring ----------------------------------------------------------------
# Sliced Wasserstein-2 compares sample sets through seeded 1-D projections (there optimal transport is sorting);
# straightness, how far a flow's paths bend; FID, Gaussians fitted to Inception features (section 15).

def sliced_wasserstein(a, b, num_projections=256, seed=0):
    """SW2(a, b) = sqrt(E_θ W2²(θᵀa, θᵀb)) over random unit directions θ; a, b: (n, ...)."""
    a, b = a.flatten(1).double().cpu(), b.flatten(1).double().cpu()
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equal-size sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    theta = torch.randn(a.shape[1], num_projections, generator=torch.Generator().manual_seed(seed), dtype=a.dtype)
    theta = theta / theta.norm(dim=0)
    pa, pb = (a @ theta).sort(dim=0).values, (b @ theta).sort(dim=0).values
    return (pa - pb).square().mean().sqrt().item()

@torch.no_grad()
def straightness(velocity, z, steps=100, eps=EPS):
    """S(v) = E ∫ ‖(Z1 - Z0) - v(Z_t, t)‖² dt along v's own Euler paths of `steps` steps from z: 0 when every
    path is straight (one Euler step is exact). Over [eps, 1] the straight velocity is (Z1 - Z0)/(1 - eps)."""
    x, _, path = euler_sample(velocity, z, steps, eps, trajectory=True)
    chord = (x - z) / (1 - eps)  # the constant velocity of the straight path z -> x
    velocities = (path[1:] - path[:-1]) / ((1 - eps) / steps)
    return (chord - velocities).square().flatten(2).sum(2).mean().item()

def gaussian_stats(features):
    """Mean and covariance (float64) of (n, d) features."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)

def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """‖mu1 - mu2‖² + Tr(S1 + S2 - 2·(S1·S2)^½), the Fréchet distance of two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    root = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(root).all():  # singular product: nudge both covariances off singularity
        offset = eps * np.eye(len(sigma1))
        root = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):  # tiny imaginary parts are round-off; large, an error
        raise ValueError(f"sqrtm(S1·S2) has an imaginary part of {np.abs(root.imag).max():.3g}")
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * root.real))


# 7. The training loop --------------------------------------------------------
# One training step, the same for every stage and its objective: linear warm-up of the learning rate, the loss,
# backward, gradient clipping, AdamW, and an EMA of the weights (what samples). Around it, train() draws the batches,
# stops at a NaN, logs and checkpoints (continued bit for bit), also under torchrun (section 14).

def training_step(model, objective, batch, step, net, ema, opt, lr, lr_warmup, grad_clip, ema_decay, device,
                  precision):
    """Step `step` (from 0) on one batch: model is what the objective calls (net, or net under DDP or compiled),
    net holds the float32 weights that opt updates and ema follows. Returns the loss and logs, still on the device."""
    # the learning rate, warmed up linearly over the first lr_warmup steps
    for group in opt.param_groups:
        group["lr"] = lr * min(1.0, (step + 1) / max(1, lr_warmup))
    # the stage's objective, in bf16 autocast if asked
    with bf16_autocast(device, precision):
        loss, logs = objective(model, batch, step)
    # backward, the gradient clipped to norm grad_clip, and AdamW's update
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()
    # the EMA of the weights after n updates, its decay warmed up as the official code's: min(decay, (1 + n)/(10 + n))
    n = step + 1
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1 - min(ema_decay, (1 + n) / (10 + n)))
    return loss, logs

def train(net, objective, data, steps, batch_size, lr, lr_warmup=0, weight_decay=0.0, grad_clip=1.0,
          ema_decay=0.999, seed=0, device="cpu", precision="fp32", compile=False, checkpoint=None, meta=None,
          resume=False, log_every=100, ckpt_every=1000, preview=None, preview_every=0, ema=None, history=None):
    """Minimise objective(model, batch, step) for `steps` steps, batch = data.sample(batch_size) (this process's share
    of the global batch); return the EMA of net, kept in `ema` if given (a copy of net on its device, which the
    objective reads too) or in a copy of its own. A `checkpoint` path saves the run every ckpt_every steps, with
    meta (stage, dataset, model_name, data_shape); resume=True continues it. preview(ema, step): every preview_every
    steps. history: a History that keeps every logged value, saved with each checkpoint."""
    settings = dict(steps=steps, batch_size=batch_size, lr=lr, lr_warmup=lr_warmup, weight_decay=weight_decay,
                    grad_clip=grad_clip, ema_decay=ema_decay, seed=seed, precision=precision, compile=compile)
    meta, (rank, processes) = meta or {"stage": "train"}, world()
    opt = adamw(net, lr, weight_decay, device)
    ema = (copy.deepcopy(net) if ema is None else ema).eval().requires_grad_(False)
    step, saved = 0, None
    torch.manual_seed(seed + rank)  # each process its own noise; batches come from data's shared stream
    if resume and checkpoint and Path(checkpoint).exists():
        step = saved = resume_training(checkpoint, meta, net, ema, opt, data, seed)
    if history is not None:
        history.start(step)  # a resumed run redoes what was logged after its checkpoint
    model = training_view(net, device, compile)  # what the objective calls: net, under DDP and/or compiled
    net.train()
    progress, first_step = Progress(steps, step), step
    # the first step with a non-finite loss (`steps`: none), kept on the device so that no step waits for the GPU
    bad_step = torch.tensor(steps, device=device)
    try:
        while step < steps:
            loss, logs = training_step(model, objective, data.sample(batch_size, rank, processes), step, net, ema,
                                       opt, lr, lr_warmup, grad_clip, ema_decay, device, precision)
            bad_step = torch.where(torch.isfinite(loss.detach()), bad_step, bad_step.clamp(max=step))
            step += 1
            if compile and step == first_step + 1:  # torch.compile compiles in the first step, on the host
                print(f"[{meta['stage']}] first step, compilation included: {duration(progress.elapsed())}", flush=True)
                progress.restart(step)  # the rate and time left of the compiled steps
            log, save = step % log_every == 0 or step == steps, step % ckpt_every == 0 or step == steps
            show = preview is not None and preview_every and step % preview_every == 0
            if (log or save or show) and first_bad_step(bad_step) < steps:  # so a NaN never reaches a checkpoint
                raise TrainingError(f"[{meta['stage']}] loss is not finite from step {int(bad_step)} on; stopped at "
                                    f"step {step}. {last_good(checkpoint, saved)}")
            if log:
                rate, left = progress.update(step)
                values = {"loss": loss.item(), **{k: float(v) for k, v in logs.items()}}
                print(f"[{meta['stage']}] step {step}/{steps}  " + "  ".join(f"{k} {v:.4f}" for k, v in values.items())
                      + f"  {rate:.1f} it/s  {duration(left)} left", flush=True)
                if history is not None:
                    history.add(step, {**values, "lr": opt.param_groups[0]["lr"], "it/s": rate})
            if save:
                if not all(torch.isfinite(p).all() for p in [*net.parameters(), *ema.parameters()]):
                    raise TrainingError(f"[{meta['stage']}] the weights or their EMA are not finite at step {step}. "
                                        f"{last_good(checkpoint, saved)}")
                if checkpoint:
                    save_training(checkpoint, {**meta, "step": step, "model": net.state_dict(), "ema": ema.state_dict(),
                                               "optimizer": opt.state_dict(), "training": settings}, data)
                    saved = step
            if show and rank == 0:  # after the checkpoint, which a failed preview must not cost
                preview(ema, step)
            if save and history is not None and rank == 0:  # after the preview, whose values it keeps
                history.save()
    except (KeyboardInterrupt, torch.OutOfMemoryError) as err:  # Ctrl-C, or a batch too large for the device
        kept = last_good(checkpoint, saved) + ("; --resume continues it" if saved is not None else "")
        if isinstance(err, KeyboardInterrupt):
            raise KeyboardInterrupt(f"[{meta['stage']}] stopped at step {step}. {kept}") from None
        raise TrainingError(f"[{meta['stage']}] out of memory on {device_memory(device)} at step {step}: lower "
                            f"--batch-size. {kept}") from None
    if step > first_step:
        print(f"[{meta['stage']}] {step - first_step} steps in {duration(progress.elapsed())}", flush=True)
    barrier()  # the next stage, in any process, reads the final checkpoint
    return ema


# 8. The pipeline, stage by stage ---------------------------------------------
# Each stage reads what the one before wrote under --out (runs/<dataset>):
#     teacher.pt -> pairs.pt -> reflow.pt -> distill.pt (or traflow.pt)
# cfg: one stage's settings, from the defaults and the flags (section 18). stage_all (section 16) runs all four.

def stage_teacher(cfg):
    """The 1-rectified flow v1: rectified flow on noise and data paired at random."""
    v1 = build_model(cfg.teacher_model, cfg.shape)
    train_stage(cfg, "teacher", v1, RectifiedFlowLoss(), training_data(cfg),
                preview=lambda v, z: euler_sample(v, z, 8)[0])

def stage_pairs(cfg):
    """The teacher's coupling: Z0 ~ N(0, I), and Z1 the end of v1's ODE from Z0, by RK45."""
    v1, _ = load_stage_network(cfg, "teacher")
    z0, velocity = fixed_noise(cfg, cfg.num_pairs, "pairs"), compile_if(v1, cfg.compile)
    solve_pairs(cfg, z0, lambda z: rk45_sample(velocity, z, rtol=cfg.rtol, atol=cfg.atol), v1)  # then saved

def stage_reflow(cfg):
    """Annealing Reflow: a small 2-rectified flow v2, from random weights, on the pairs; at each preview, its
    straightness on 32 draws of the preview noise in 20 Euler steps, for the history (20 calls on a batch of 32)."""
    print(f"[reflow] Annealing Reflow: beta {cfg.beta_schedule} over K = {cfg.anneal_steps} steps")
    v2 = build_model(cfg.model, cfg.shape)
    train_stage(cfg, "reflow", v2, AnnealingReflowLoss(cfg.anneal_steps, cfg.beta_schedule), load_pairs(cfg),
                preview=lambda v, z: one_step_sample(v, z)[0],
                track=lambda v, z: {"straightness": straightness(v, z[:32], steps=20)})  # the paper's Fig. c

def stage_distill(cfg):
    """Flow-Guided Distillation: G(z) = z + u(z, eps), guided by v2 (its EMA weights) frozen.
    u starts from v2's raw weights, with an EMA of its own, as in the official code."""
    v2, model_name = load_stage_network(cfg, "reflow")
    G = OneStepGenerator(load_stage_network(cfg, "reflow", weights="model")[0].train().requires_grad_(True))
    distance = lpips_distance(cfg) if cfg.distance == "lpips" else DISTANCES[cfg.distance]
    objective = FlowGuidedDistillationLoss(compile_if(v2, cfg.compile), distance, cfg.reg_weight, cfg.target_form)
    print(f"[distill] Flow-Guided Distillation: distance {cfg.distance}, lambda {cfg.reg_weight}, "
          f"target {cfg.target_form}")
    train_stage(cfg, "distill", G, objective, load_pairs(cfg), preview=lambda g, z: g(z), model_name=model_name)

def stage_traflow(cfg):
    """TraFlow on the pairs: the student starts as the teacher (or as v2: --traflow-from reflow)."""
    v, model_name = load_stage_network(cfg, cfg.traflow_from)
    student = build_model(model_name, cfg.shape, two_times=True)
    student.load_state_dict(add_second_time(v.state_dict()))  # its s embedding: a copy of t's
    ema = copy.deepcopy(student) if cfg.traflow_target == "ema" else None  # train() keeps the EMA in it
    objective = TraFlowLoss(v, cfg.lambda_vel, cfg.lambda_cons, cfg.traflow_phases, cfg.traflow_midpoint, ema)
    print(f"[traflow] from the {cfg.traflow_from} flow: lambda_vel {cfg.lambda_vel}, lambda_cons "
          f"{cfg.lambda_cons}, phases {cfg.traflow_phases}, midpoint {cfg.traflow_midpoint}")
    train_stage(cfg, "traflow", student.train(), objective, load_pairs(cfg),
                preview=lambda g, z: traflow_sample(g, z, 1)[0], model_name=model_name, ema=ema)


# =============================================================================
# PART II: THE MACHINERY
# Image files, two-time networks and the official checkpoints' names, our checkpoints and the run directory, pairs
# solved in shards, several processes and the device, the pretrained feature networks (FID's Inception, LPIPS),
# sampling and evaluation, the benchmark and the command line: how Part I's method is run, not what it is.
# =============================================================================

# 9. Image data ---------------------------------------------------------------
# Images stay in memory as uint8, drawn with replacement by the data's own seeded generator (saved in
# checkpoints): a run reproduces from its seed, a resumed run draws the same batches, and all processes
# draw the same global batches, each keeping its slice.

IMAGE_DATASETS = ("cifar10", "mnist", "fashion_mnist", "folder", "shapes")

def shapes_images(n, size=32, seed=0):
    """Procedural images (offline), uint8 (n, 3, size, size): a disc, square, diamond or triangle on a plain ground."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)[:, None]  # each (1, size, size)
    cx, cy = (rng.uniform(0.3, 0.7, (2, n, 1, 1)) * size)
    r = rng.uniform(0.15, 0.3, (n, 1, 1)) * size
    dx, dy = np.abs(xx - cx), np.abs(yy - cy)
    masks = np.stack([dx**2 + dy**2 < r**2,                              # disc
                      (dx < 0.8 * r) & (dy < 0.8 * r),                    # square
                      dx + dy < r,                                         # diamond
                      (yy - cy < 0.7 * r) & (2 * dx < yy - cy + r)])       # triangle
    mask = masks[rng.integers(0, 4, n), np.arange(n)]                      # (n, size, size)
    background, colour = rng.integers(0, 256, (2, n, 3, 1, 1))
    return torch.from_numpy(np.where(mask[:, None], colour, background).astype(np.uint8))

def read_idx_images(path):
    """The MNIST file format (idx3-ubyte, optionally gzipped) as uint8 (n, 1, h, w)."""
    with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
        raw = f.read()
    n, h, w = (int.from_bytes(raw[i:i + 4], "big") for i in (4, 8, 12))
    if len(raw) < 16 + n * h * w:
        raise UsageError(f"{path} is truncated: {(len(raw) - 16) // max(1, h * w)} of its {n} images; fetch it again")
    return torch.frombuffer(bytearray(raw[16:]), dtype=torch.uint8).reshape(n, 1, h, w)

def image_dataset(name, data_dir, image_size=32, limit=None, seed=0, train=True):
    """Training images (train=False: the test set; a folder has none) as uint8 (n, c, image_size, image_size)."""
    from torchvision import datasets, transforms as T  # only the image path needs torchvision
    data_dir, part = Path(data_dir), "train" if train else "t10k"
    idx = [p for p in (data_dir / f"{part}-images-idx3-ubyte", data_dir / f"{part}-images-idx3-ubyte.gz") if p.exists()]
    if name == "shapes":
        x = shapes_images(limit or 10_000, image_size, seed if train else seed + 1)
    elif name in ("mnist", "fashion_mnist") and idx:  # plain idx files, e.g. Debian's dataset-fashion-mnist
        x = read_idx_images(idx[0])
    elif name in ("mnist", "fashion_mnist", "cifar10"):
        dataset = getattr(datasets, {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}[name])
        try:
            x = torch.as_tensor(dataset(str(data_dir), train=train, download=True).data)
        except Exception as err:
            reason = str(err).partition("\n")[0]  # torchvision's messages run over several lines
            raise UsageError(f"could not load {name} into {data_dir} ({type(err).__name__}: {reason}); offline? put "
                             f"the files there as torchvision expects them, or for fashion_mnist pass --data-dir "
                             f"/usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)") from None
        x = x[:, None] if x.dim() == 3 else x.permute(0, 3, 1, 2)  # grey (n, h, w) or RGB (n, h, w, 3)
    elif name == "folder":
        from PIL import Image
        files = sorted(p for p in data_dir.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".webp"))
        if not files:
            raise UsageError(f"no images (.png, .jpg, .jpeg, .bmp, .webp) under --data-dir {data_dir}")
        crop, images = T.Compose([T.Resize(image_size), T.CenterCrop(image_size), T.PILToTensor()]), []
        for path in files[:limit]:
            try:
                images.append(crop(Image.open(path).convert("RGB")))
            except OSError as err:  # PIL's UnidentifiedImageError is one
                raise UsageError(f"{path} is not a readable image ({type(err).__name__}); move it out of --data-dir"
                                 ) from None
        x = torch.stack(images)
    else:
        raise UsageError(f"unknown image dataset {name!r}; choose from {', '.join(IMAGE_DATASETS)}")
    x = x[:limit]
    if x.shape[-1] != image_size:  # e.g. 28x28 MNIST to the U-Net's 32x32
        x = F.interpolate(x.float(), size=image_size, mode="bilinear", antialias=True).round().clamp(0, 255)
    return x.to(torch.uint8)

def to_unit_range(x):
    return x.float() / 127.5 - 1 if x.dtype == torch.uint8 else x.float()

class TrainingData:
    """The tensors of a pair (Z0, Z1) share indices and random horizontal flips: a flipped Gaussian is still
    Gaussian, so a flipped pair is still a coupling. Tensors stay compact (uint8, float16), and move to the GPU
    when they fit in a quarter of its free memory."""

    def __init__(self, *tensors, flip=False, device="cpu", seed=0):
        self.flip, self.device, self.generator = flip, torch.device(device), torch.Generator().manual_seed(seed)
        fits = self.device.type != "cuda" or sum(t.nbytes for t in tensors) < torch.cuda.mem_get_info(device)[0] / 4
        self.tensors = [t.to(device) if fits else t for t in tensors]

    def sample(self, batch_size, rank=0, processes=1):
        mine = slice(rank * batch_size, (rank + 1) * batch_size)
        idx = torch.randint(len(self.tensors[0]), (batch_size * processes,), generator=self.generator)[mine]
        # non_blocking: a blocking copy to a GPU would wait for the whole queue of earlier work
        out = [to_unit_range(t[idx.to(t.device, non_blocking=True)].to(self.device, non_blocking=True))
               for t in self.tensors]
        if self.flip:
            flip = torch.rand(batch_size * processes, generator=self.generator)[mine] < 0.5
            flip = flip.to(self.device, non_blocking=True)[:, None, None, None]
            out = [torch.where(flip, o.flip(-1), o) for o in out]
        return out[0] if len(out) == 1 else tuple(out)


# 10. Two-time networks, and the official checkpoints' names ------------------

def add_second_time(state_dict):
    """A one-time network's weights for its two-time (TraFlow) twin: s's embedding is a copy of t's, and both
    halves of the sum are halved, so that s = t reproduces the one-time network exactly."""
    state = dict(state_dict)
    if "time_mlp.0.weight" in state:  # U-Net: temb = time_mlp(t)/2 + s_mlp(s)/2, halved in the last layer
        for key in [k for k in state if k.startswith("time_mlp.")]:
            state[key] = state[key] / 2 if key.startswith("time_mlp.2.") else state[key]
            state[key.replace("time_mlp.", "s_mlp.")] = state[key].clone()
    else:  # MLP: the first layer's columns that read t's embedding (after the data's)
        dim = len(list(state.values())[-1])  # the output layer's bias: one entry per data dimension
        w = state["net.0.weight"].clone()
        w[:, dim:] /= 2
        state["net.0.weight"], state["s_proj.weight"] = w, w[:, dim:].clone()
    return state

# Official checkpoints (the Rectified Flow and SlimFlow code) name the U-Net's modules by position in the
# order ours are created, `all_modules.<i>` (see `ends` below), and a block's layers as below. Attention's
# NIN layers store W as an (in, out) matrix applied as x·W: the transpose of a 1x1 convolution's weight.
OFFICIAL_RESBLOCK = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "Dense_0": "temb_proj",
                     "GroupNorm_1": "norm2", "Conv_1": "conv2", "Conv_2": "shortcut"}
OFFICIAL_ATTENTION = {"GroupNorm_0": "norm", "NIN_0": "q", "NIN_1": "k", "NIN_2": "v", "NIN_3": "proj"}

def official_names(keys, official):
    """{our tensor name: the official one} for a U-Net with these tensor names, official ones or ours."""
    prefix, offset, attention = ("all_modules.", 0, ".NIN_") if official else ("blocks.", 3, ".q.")
    index = {k: int(k.split(".")[1]) + offset for k in keys if k.startswith(prefix)}  # all_modules.<i>'s i
    n = max(index.values()) + (1 if official else 3)  # n modules; ours: out_norm and out_conv follow the blocks
    attn = {i for k, i in index.items() if attention in k}  # those that are attention blocks
    ends = {0: "time_mlp.0", 1: "time_mlp.2", 2: "input_conv", n - 2: "out_norm", n - 1: "out_conv"}
    names = {}
    for i in range(n):
        layers = OFFICIAL_ATTENTION if i in attn else OFFICIAL_RESBLOCK
        modules = {"": ends[i]} if i in ends else {f".{theirs}": f"blocks.{i - 3}.{ours}"
                                                   for theirs, ours in layers.items()}
        for theirs, ours in modules.items():
            for param, their_param in zip(("weight", "bias"), ("W", "b") if ".NIN" in theirs else ("weight", "bias")):
                names[f"{ours}.{param}"] = f"all_modules.{i}{theirs}.{their_param}"
    return names

def to_official(state_dict):
    """Our U-Net tensor names -> the official ones (no `module.` prefix)."""
    names = official_names(state_dict, official=False)
    return {names[k]: v[:, :, 0, 0].t() if names[k].endswith(".W") else v for k, v in state_dict.items()}

def from_official(state_dict):
    """Official U-Net tensor names -> ours; those with no counterpart (the `sigmas` buffer) are dropped, logged."""
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    ours = {theirs: mine for mine, theirs in official_names(state_dict, official=True).items()}
    if ignored := [k for k in state_dict if k not in ours]:
        print(f"[load] official entries with no counterpart, ignored: {', '.join(ignored)}")
    return {ours[k]: v.t()[:, :, None, None] if k.endswith(".W") else v for k, v in state_dict.items() if k in ours}


# 11. Checkpoints -------------------------------------------------------------
# Written atomically; a slimflow checkpoint holds the weights, the EMA, the optimizer, the
# step, the training settings and the random state of the data and of every process.

def save_atomic(obj, path):
    """torch.save obj (or call obj(file)) to a temporary file, renamed once whole: a failed write keeps the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if callable(obj):
            with open(tmp, "wb") as f:
                obj(f)
        else:
            torch.save(obj, tmp)
        os.replace(tmp, path)
    except RuntimeError as err:  # how torch.save's writer reports a full disk
        reason = str(err).partition("\n")[0]
        raise OSError(f"could not write {path} ({reason}); is the disk full?") from None
    finally:
        tmp.unlink(missing_ok=True)  # left only by a failed write

def save_json(obj, path):
    save_atomic(lambda f: f.write(json.dumps(obj, indent=1).encode()), path)

def read_json(path, default=None):
    if not Path(path).exists():
        return default
    try:
        return json.loads(Path(path).read_text())
    except ValueError:
        raise UsageError(f"{path} is corrupt (not JSON); move it away, then run again") from None

def save_training(path, state, data):
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    rng = {"data": data.generator.get_state(), "processes": gather({"torch": torch.get_rng_state(), "cuda": cuda})}
    if world()[0] == 0:
        save_atomic({"format": "slimflow", **state, "rng": rng}, path)

def resume_training(checkpoint, meta, net, ema, opt, data, seed):
    """Load a training checkpoint into net, ema, opt and the random states; returns its step."""
    rank, processes = world()
    ckpt = read_checkpoint(checkpoint)
    check_compatible(ckpt, checkpoint, meta.get("dataset"), meta.get("model_name"))
    if "data" not in ckpt["rng"]:
        raise UsageError(f"{checkpoint} was written by an older slimflow and cannot be continued exactly; "
                         f"pass --overwrite to start over")
    for part, key in ((net, "model"), (ema, "ema"), (opt, "optimizer")):
        part.load_state_dict(ckpt[key])
    data.generator.set_state(ckpt["rng"]["data"])
    step, states = ckpt["step"], ckpt["rng"]["processes"]
    if len(states) == processes:
        torch.set_rng_state(states[rank]["torch"])
        if states[rank]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states[rank]["cuda"])
    else:  # the data stream continues (in global batches of another size); the noise cannot
        torch.manual_seed(seed + rank + processes * step)
        print(f"[{meta['stage']}] the checkpoint was written by {len(states)} processes, this run has "
              f"{processes}: the noise streams restart")
    print(f"[{meta['stage']}] resumed from {checkpoint} at step {step}")
    return step

def last_good(checkpoint, saved):
    return f"Last good checkpoint: {checkpoint} (step {saved})" if saved is not None else "No checkpoint was written."

def read_checkpoint(path, made_by=None, official_ok=False):
    """A slimflow checkpoint (or, official_ok, an official one: a dict with `model`) as a dict, else a UsageError."""
    if not Path(path).exists():
        raise UsageError(f"{path} not found" + (f"; make it with: python slimflow.py {made_by}" if made_by else ""))
    ckpt = load_file(path, "a slimflow")
    ours = isinstance(ckpt, dict) and ckpt.get("format") == "slimflow"
    if not (ours or official_ok and isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict)):
        raise UsageError(f"{path} is not a slimflow checkpoint" + (" nor an official one" if official_ok else ""))
    return ckpt

def load_file(path, what):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"{path} is corrupt or not {what} file ({type(err).__name__})") from None

def check_compatible(ckpt, path, dataset=None, model=None, shape=None):
    if dataset is not None and ckpt["dataset"] != dataset:
        raise UsageError(f"{path} was made for dataset {ckpt['dataset']!r}, not {dataset!r}")
    if shape is not None:
        held = tuple(ckpt["data_shape"] if "data_shape" in ckpt else ckpt["z0"].shape[1:])  # a network's, or pairs'
        if held != tuple(shape):
            raise UsageError(f"{path} holds data of shape {held}, not {tuple(shape)}; another --image-size?")
    if model is not None and ckpt["model_name"] != model:
        raise UsageError(f"{path} holds a {ckpt['model_name']!r} network, not {model!r}")

def check_tensors(found, expected, path):
    """Every expected tensor, with its shape (BatchNorm's counters may be missing), and no other."""
    for name, tensor in expected.items():
        if name not in found and not name.endswith("num_batches_tracked"):
            raise UsageError(f"{path}: tensor {name} is missing")
        if name in found and found[name].shape != tensor.shape:
            raise UsageError(f"{path}: tensor {name} has shape {tuple(found[name].shape)}, "
                             f"the network needs {tuple(tensor.shape)}")
    if extra := [k for k in found if k not in expected]:
        raise UsageError(f"{path}: tensors with no place in the network: {', '.join(extra[:5])}")

def load_weights(net, weights, what):
    state = weights if isinstance(weights, dict) else load_file(weights, f"a {what} weights")
    check_tensors(state, net.state_dict(), f"{what} weights")
    net.load_state_dict(state, strict=False)
    return net

def load_checkpoint(path, model, ckpt=None, weights="ema"):
    """`model` with the EMA weights (weights="model": the raw ones) of a slimflow or an official checkpoint."""
    ckpt = read_checkpoint(path, official_ok=True) if ckpt is None else ckpt
    if ckpt.get("format") == "slimflow":
        return load_weights(model, ckpt[weights], path)
    if not isinstance(model, UNet):
        raise UsageError(f"{path} is an official checkpoint: it loads into a U-Net preset only")
    state = {k.removeprefix("module."): v for k, v in ckpt["model"].items()}
    names = [k for k in state if k.startswith("all_modules.")]  # all but the `sigmas` buffer
    shadow = ckpt["ema"].get("shadow_params") if weights == "ema" and isinstance(ckpt.get("ema"), dict) else None
    if shadow:  # the EMA: a list in the official model.parameters() order
        if len(names) != len(shadow):
            raise UsageError(f"{path}: the EMA holds {len(shadow)} tensors but the model {len(names)}")
        state.update(zip(names, shadow))
    check_tensors({k: state[k] for k in names}, to_official(model.state_dict()), path)
    model.load_state_dict(from_official(state))
    return model


# 12. The run directory: what each stage reads and writes ---------------------

STAGE_FILES = ("teacher", "pairs", "reflow", "distill", "traflow")  # each writes <out>/<stage>.pt
FLOW_STAGES = ("teacher", "reflow", "distill")

def out_path(cfg, stage):
    return Path(cfg.out) / f"{stage}.pt"

def make_command(cfg, stage):
    return f"--dataset {cfg.dataset} --out {cfg.out} --stage {stage}"

# Fixed noise: one stream per use (seed + offset), apart from process r's training noise (seed + r).
# The pairs' Z0 are training data (G learns G(Z0) = Z1 on them): samples, previews and FID never reuse them.
NOISE_STREAMS = {"pairs": 10**6, "samples": 10**6 + 1, "trajectories": 10**6 + 3, "eval": 10**6 + 4}

def fixed_noise(cfg, n, stream):
    """n draws of X0 ~ N(0, I) in the data's shape, on the host: the same in every run and process."""
    return torch.randn(n, *cfg.shape, generator=torch.Generator().manual_seed(cfg.seed + NOISE_STREAMS[stream]))

def training_data(cfg):
    if cfg.toy:  # a large fixed pool of points stands in for the distribution
        return TrainingData(toy_data(cfg.dataset, 100_000, cfg.seed), device=cfg.device, seed=cfg.seed)
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0  # under torchrun, one process per machine downloads
    if not first:
        barrier()
    x = image_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.max_images, cfg.seed)
    if first:
        barrier()
    print(f"[data] {cfg.dataset}: {len(x)} images of shape {tuple(x.shape[1:])}")
    return TrainingData(x, flip=cfg.flip, device=cfg.device, seed=cfg.seed)

def load_pairs(cfg):
    path = out_path(cfg, "pairs")
    pairs = read_checkpoint(path, made_by=make_command(cfg, "pairs"))
    check_compatible(pairs, path, cfg.dataset, shape=cfg.shape)
    return TrainingData(pairs["z0"], pairs["z1"], flip=cfg.flip and not cfg.toy, device=cfg.device, seed=cfg.seed)

def load_stage_network(cfg, stage, weights="ema"):
    """A stage's EMA network (or raw one: weights="model") and its preset's name: from --teacher-ckpt or
    --init-ckpt (reflow) when given, a path or URL, ours or official; else from --out."""
    given = {"teacher": cfg.teacher_ckpt, "reflow": cfg.init_ckpt}.get(stage)
    if given and given.startswith(("https://", "http://")):  # e.g. the published files: kept, per URL
        given = download(given, Path(cfg.data_dir) / "checkpoints" / hashlib.sha256(given.encode()).hexdigest()[:12],
                         f"the checkpoint {given}", "--teacher-ckpt" if stage == "teacher" else "--init-ckpt")
    path = Path(given) if given else out_path(cfg, stage)
    ckpt = read_checkpoint(path, made_by=make_command(cfg, stage), official_ok=bool(given))
    made_by = ckpt.get("stage")  # None for an official checkpoint, whose architecture comes from the preset flag
    if made_by is not None:
        if made_by != stage and not (stage == "reflow" and made_by == "teacher"):
            raise UsageError(f"{path} holds the {made_by!r} stage, not {stage!r}")
        check_compatible(ckpt, path, cfg.dataset, shape=cfg.shape)
    model_name = ckpt.get("model_name") or (cfg.teacher_model if stage == "teacher" else cfg.model)
    net = build_model(model_name, cfg.shape, two_times=made_by == "traflow")
    net = load_checkpoint(path, OneStepGenerator(net) if made_by == "distill" else net, ckpt, weights)
    return to_device(net, cfg.device, cfg.channels_last).eval().requires_grad_(False), model_name

def duration(seconds):
    """12.3s, 4m05s or 2h07m."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes = int(seconds // 60)
    return f"{minutes}m{int(seconds % 60):02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"

class Progress:
    """A long loop's rate and time left, from its recent rate (over the last `window` updates, so that start-up and
    compilation fall out of it), and its wall time."""

    def __init__(self, total, done=0, window=5, clock=time.monotonic):
        self.total, self.window, self.clock = total, window, clock
        self.start = clock()
        self.marks = [(done, self.start)]

    def update(self, done):
        """(done per second, seconds left)."""
        now = self.clock()
        self.marks = (self.marks + [(done, now)])[-self.window - 1:]
        rate = (done - self.marks[0][0]) / max(now - self.marks[0][1], 1e-9)
        return rate, (self.total - done) / rate if rate > 0 else math.inf

    def restart(self, done):
        """The rate from here on, with what came before (a compilation) out of it; the wall time keeps it."""
        self.marks = [(done, self.clock())]

    def elapsed(self):
        return self.clock() - self.start

def in_batches(x, batch_size, what, unit):
    """x.split(batch_size), with a progress line after each batch (rate, time left) and one for the whole."""
    done, progress = 0, Progress(len(x))
    for part in x.split(batch_size):
        yield part
        done += len(part)
        rate, left = progress.update(done)
        progress_line(f"{what} {done}/{len(x)} {unit}  {rate:.0f} img/s  {duration(left)} left")
    progress_line(f"{what} {len(x)} {unit} in {duration(progress.elapsed())}", last=True)

def progress_line(text, last=False):
    """A progress line: on a terminal rewritten in place (`last` ends it), in a log file one line each."""
    if sys.stdout.isatty():
        print(("\n" if last else "\r") + text + ("\n" if last else " "), end="", flush=True)
    else:
        print(text, flush=True)

class History:
    """A stage's logged values by step (loss, its terms, β, learning rate, it/s, and values tracked at previews), kept
    in <out>/history_<stage>.jsonl, one JSON object a line, and drawn in history_<stage>.png, both rewritten with each
    checkpoint. A resumed run keeps the lines up to its checkpoint and redoes the rest."""

    def __init__(self, out, stage):
        self.path, self.rows = Path(out) / f"history_{stage}.jsonl", {}

    def start(self, step):
        self.rows = {}
        if self.path.exists():
            try:
                rows = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            except ValueError:
                raise UsageError(f"{self.path} is corrupt (not JSON lines); move it away, then run again") from None
            self.rows = {r["step"]: r for r in rows if r["step"] <= step}

    def add(self, step, values):
        self.rows.setdefault(step, {"step": step}).update(values)

    def save(self):
        rows = [self.rows[k] for k in sorted(self.rows)]
        save_atomic(lambda f: f.write("".join(json.dumps(r) + "\n" for r in rows).encode()), self.path)
        from matplotlib.figure import Figure  # drawn off-screen, without pyplot
        keys = dict.fromkeys(k for r in rows for k in r if k != "step")
        curves = {k: [(r["step"], r[k]) for r in rows if k in r and math.isfinite(r[k])] for k in keys}
        curves = {k: points for k, points in curves.items() if points}
        if not curves:
            return
        fig = Figure(figsize=(3.2 * len(curves), 2.8))
        for ax, (key, points) in zip(fig.subplots(1, len(curves), squeeze=False)[0], curves.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(values) < 30 else None)
            if min(values) > 0 and max(values) > 10 * min(values):  # a loss that spans decades
                ax.set_yscale("log")
            ax.set(title=key, xlabel="step")
        fig.subplots_adjust(left=0.25 / len(curves), right=1 - 0.05 / len(curves), bottom=0.18, wspace=0.4)
        save_atomic(lambda f: fig.savefig(f, format="png", dpi=80), self.path.with_suffix(".png"))

def train_stage(cfg, stage, net, objective, data, preview, model_name=None, ema=None, track=None):
    """train() in cfg's settings, checkpointed to --out, with previews of preview(ema, z) and the values of
    track(ema, z) in the stage's history; returns the EMA (kept in `ema` if given)."""
    model_name, processes = model_name or (cfg.teacher_model if stage == "teacher" else cfg.model), world()[1]
    print(f"[{stage}] {model_name}: {num_params(net):,} parameters, {cfg.steps} steps of batch "
          f"{cfg.batch_size} on {cfg.device}" + (f" x {processes} processes" if processes > 1 else ""))
    net = to_device(net, cfg.device, cfg.channels_last)
    if ema is not None:  # the objective holds it too: nn.Module.to moves it in place, for both
        to_device(ema, cfg.device, cfg.channels_last)
    z, folder = fixed_noise(cfg, 2000 if cfg.toy else 64, "samples").to(cfg.device), Path(cfg.out) / "previews"
    history = History(cfg.out, stage)

    def show(ema, step):
        save_preview(preview(ema, z), folder / f"{stage}_{step:07d}.png", cfg)
        if track is not None:
            history.add(step, track(ema, z))
    return train(net, objective, data, cfg.steps, cfg.batch_size, cfg.lr, lr_warmup=cfg.lr_warmup,
                 weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, ema_decay=cfg.ema_decay, seed=cfg.seed,
                 device=cfg.device, precision=cfg.precision, compile=cfg.compile, checkpoint=out_path(cfg, stage),
                 meta=dict(stage=stage, dataset=cfg.dataset, model_name=model_name, data_shape=list(cfg.shape)),
                 resume=cfg.resume, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every, preview_every=cfg.preview_every,
                 preview=show, ema=ema, history=history)

def save_preview(x, path, cfg):
    """A PNG of samples: an image grid, or 2-D samples over the data; or panels {title: paths (steps, n, 2)}."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if torch.is_tensor(x) and x.dim() == 4:
        import torchvision
        return torchvision.utils.save_image((x[:64].float().cpu() + 1) / 2, path, nrow=8)
    from matplotlib.figure import Figure  # drawn off-screen, without pyplot
    panels = x if isinstance(x, dict) else {Path(path).stem: x[None, :2000]}
    fig, data = Figure(figsize=(4 * len(panels), 4)), toy_data(cfg.dataset, 3000, cfg.seed + 6)
    for ax, (title, paths) in zip(fig.subplots(1, len(panels), sharey=True, squeeze=False)[0], panels.items()):
        paths = paths.cpu()
        ax.scatter(*data.T, s=1, c="0.8")
        if len(paths) > 1:  # from noise to sample
            ax.plot(paths[:, :, 0], paths[:, :, 1], c="C0", lw=0.4, alpha=0.5)
            ax.scatter(*paths[0].T, s=3, c="C1", label="noise Z0")
        ax.scatter(*paths[-1].T, s=3, c="C2", label="sample")
        ax.set(title=title, xlim=(-5, 5), ylim=(-5, 5))
    fig.axes[0].legend(loc="upper right", markerscale=3)
    fig.savefig(path, dpi=100, bbox_inches="tight")


# 13. Pairs in shards ---------------------------------------------------------

def solve_pairs(cfg, z0, solve, teacher):
    """Z1 = solve(Z0) in shards of --pairs-batch pairs, joined into pairs.pt. Z0 is fixed by the seed, so a shard
    is the same whoever solves it and whenever: shards on disk are skipped (a stopped run goes on) and torchrun's
    processes share the missing ones. Images are kept in float16 (Z0 rounded first: every pair is exact). Shards
    and pairs.pt keep their recipe (the teacher's weights as a hash, seed, count, tolerances): another's is refused."""
    path, (rank, processes) = out_path(cfg, "pairs"), world()
    shards = path.with_suffix(".shards")
    weights = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in teacher.parameters()))
    recipe = {"dataset": cfg.dataset, "shape": list(cfg.shape), "seed": cfg.seed, "num_pairs": cfg.num_pairs,
              "pairs_batch": cfg.pairs_batch, "rtol": cfg.rtol, "atol": cfg.atol, "teacher": weights.hexdigest()}
    reuse = path.exists() and cfg.resume  # pairs.pt is reused for the same teacher and recipe only
    made = read_checkpoint(path).get("recipe") if reuse else read_json(shards / "recipe.json", default=recipe)
    change = ("by an older slimflow, which kept no recipe" if made is None  # how it differs from this run's, in words
              else "with another " + ", ".join(k for k in recipe if made.get(k) != recipe[k]))
    if made != recipe and reuse:
        raise UsageError(f"{path} was solved {change}; solve them again with: "
                         f"python slimflow.py {make_command(cfg, 'pairs')} --overwrite")
    if made != recipe and not cfg.overwrite:
        raise UsageError(f"{shards} holds shards solved {change}; pass --overwrite to start over")
    if reuse:
        print(f"[pairs] reusing {path}: same teacher and recipe")
        return
    z0, starts = z0.to(torch.float32 if cfg.toy else torch.float16), range(0, cfg.num_pairs, cfg.pairs_batch)
    shard = {i: shards / f"{i:09d}-{min(i + cfg.pairs_batch, cfg.num_pairs):09d}.pt" for i in starts}
    todo = [i for i in starts if cfg.overwrite or not shard[i].exists()]  # --overwrite: all, removed below
    barrier()  # every process has read the old recipe and listed the missing shards before rank 0 starts over
    if rank == 0:
        if cfg.overwrite:
            shutil.rmtree(shards, ignore_errors=True)
        save_json(recipe, shards / "recipe.json")
    barrier()
    if len(todo) < len(starts):
        print(f"[pairs] {len(starts) - len(todo)} of {len(starts)} shards already in {shards}; solving the rest")
    mine = todo[rank::processes]
    progress = Progress(len(mine))
    try:
        for n, i in enumerate(mine, 1):
            x, nfe = solve(z0[i:i + cfg.pairs_batch].float().to(cfg.device))
            save_atomic({"z1": x.cpu().to(z0.dtype), "nfe": nfe}, shard[i])
            left = progress.update(n)[1]
            print(f"[pairs] shard {shard[i].stem}  NFE {nfe}  {min(n * processes, len(todo))}/{len(todo)} shards in "
                  f"{duration(progress.elapsed())}, {duration(left)} left", flush=True)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"[pairs] shards solved stay in {shards}: the same command goes on from them") from None
    except torch.OutOfMemoryError:  # RK45 solves a shard as one system, so its size is part of the recipe
        raise TrainingError(f"[pairs] out of memory on {device_memory(cfg.device)} solving {cfg.pairs_batch} pairs "
                            f"at once: lower --pairs-batch and pass --overwrite, which solves every shard again (the "
                            f"shard size is part of the recipe); until then the shards solved stay in {shards}"
                            ) from None
    barrier()
    if rank == 0:
        parts = [load_file(shard[i], "a pairs shard") for i in starts]
        nfe = float(np.mean([p["nfe"] for p in parts]))
        save_atomic({"format": "slimflow", "stage": "pairs", "dataset": cfg.dataset, "z0": z0,
                     "z1": torch.cat([p["z1"] for p in parts]), "teacher_nfe": nfe, "recipe": recipe}, path)
        shutil.rmtree(shards)
        print(f"[pairs] wrote {cfg.num_pairs} pairs to {path} (mean RK45 NFE {nfe:.0f}) in "
              f"{duration(progress.elapsed())}")
    barrier()


# 14. Several processes -------------------------------------------------------
# torchrun --nproc_per_node N slimflow.py ...: one process per GPU (NCCL; gloo on CPUs), each with the same
# network, its own slice of the global batch (batch_size·N from the data's shared stream) and its own noise
# (seed + rank). DDP averages the gradients in backward, so N processes take the step one would take on the
# global batch. Rank 0 alone prints and writes checkpoints and previews.

def start_processes(device):
    """Join the process group torchrun describes (WORLD_SIZE > 1): NCCL between the GPUs (cuda:LOCAL_RANK),
    gloo on CPUs. torch.distributed.nn is imported at the top, before any group exists: imported later (as
    DDP does), its default arguments would hold the group, and gloo's threads, outliving it, abort Python at exit."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # errors still reach stderr from every process

def stop_processes():
    if dist.is_initialized():
        dist.destroy_process_group()

def world():  # (rank of this process, number of processes): (0, 1) without torchrun
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

def barrier():  # e.g. until rank 0 has written a file that the others read
    if dist.is_initialized():
        dist.barrier()

def gather(obj):  # [obj of rank 0, obj of rank 1, ...] on every process
    objs = [obj] * world()[1]
    if dist.is_initialized():
        dist.all_gather_object(objs, obj)
    return objs

def first_bad_step(bad_step):  # the first non-finite step over all processes: all stop together
    if dist.is_initialized():
        dist.all_reduce(bad_step, op=dist.ReduceOp.MIN)
    return int(bad_step)

def bf16_autocast(device, precision):
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")

def adamw(net, lr, weight_decay, device):
    """AdamW on net's weights; on a GPU its fused kernel: one launch for the whole update instead of a few per
    tensor group (the AdamW step took about 10 ms of a 49 ms bf16 training step of slim-15.7m on an H200, unfused)."""
    fused = True if torch.device(device).type == "cuda" else None  # None: PyTorch's default for the device
    return torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, fused=fused)

def to_device(net, device, channels_last=False):
    """net on device, its U-Nets in the channels_last memory layout if asked. NCHW is the default: GroupNorm on
    CUDA returns NCHW (PyTorch issue 111824), so channels_last pays layout copies around every normalised
    convolution; it measured no faster on an H200; and forward-mode AD through GroupNorm in channels_last, which
    TraFlow's velocity term needs, fails in PyTorch 2.11."""
    net = net.to(device)
    if channels_last and any(isinstance(m, UNet) for m in net.modules()):
        net = net.to(memory_format=torch.channels_last)
    return net

def device_memory(device):
    """A device's name, and on a GPU the memory it has: for the message that a batch does not fit."""
    if torch.device(device).type != "cuda":
        return str(device)
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index  # "cuda" is the current one
    return f"cuda:{index} ({torch.cuda.get_device_properties(index).total_memory / 2**30:.1f} GiB)"

def compile_if(fn, compile):
    """fn, or fn compiled by torch.compile (--compile: fewer, larger kernels), for the network a stage trains (see
    training_view) and those it only runs. Compiled in its first call, and again for another batch size or grad
    mode. A compiled module is never saved: its state_dict names the weights `_orig_mod.*`."""
    return torch.compile(fn) if compile else fn

def training_view(net, device, compile=False):
    """What the objective calls: net, under DDP with several processes (which broadcasts rank 0's weights
    and averages gradients), compiled with `compile`. Weights, optimizer and EMA stay on net in float32."""
    if world()[1] > 1:
        cuda = torch.device(device).type == "cuda"
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device] if cuda else None)
    return compile_if(net, compile)


# 15. Pretrained feature networks: FID's Inception and LPIPS ------------------
# Downloaded once by download(); built here layer for layer, so that no package beyond torchvision is needed.

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")

def download(url, folder, what, flag):
    """The file at url, kept in folder: downloaded once, with a progress line; offline, a one-line error."""
    import urllib.request
    path = Path(folder) / url.split("?")[0].rsplit("/", 1)[1]

    def copy(f):  # in chunks, into save_atomic's temporary file: a 0.5 GB file is never held in memory
        with urllib.request.urlopen(url, timeout=20) as response:  # never hang offline
            size = int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(1 << 22):
                f.write(chunk)
                print(f"\r[download] {path.name}: {f.tell() / 1e6:.1f} of {size / 1e6:.1f} MB", end="")
        print()
    if not path.exists():
        try:
            save_atomic(copy, path)
        except OSError as err:
            raise UsageError(f"could not download {what} ({err}); download {url} and put it at {path.resolve()}, "
                             f"or pass {flag} PATH") from None
    return path

def tf1_resize(x, size):
    """Bilinear resize of (b, c, h, w) to size x size as TensorFlow 1 (the FID graph) does it: output pixel
    i samples the input at i·in/out, with no half-pixel centres, interpolating along the width first."""
    def taps(n):  # for each output pixel: the source pixels either side, and the weight of the second
        src = torch.arange(size, device=x.device, dtype=torch.float32) * (n / size)
        lo = src.floor().long()
        return lo, (lo + 1).clamp(max=n - 1), (src - lo).to(x.dtype)
    (top, bottom, wy), (left, right, wx) = taps(x.shape[-2]), taps(x.shape[-1])
    x = x[..., left] + (x[..., right] - x[..., left]) * wx
    return x[..., top, :] + (x[..., bottom, :] - x[..., top, :]) * wy[:, None]

def fid_inception(weights=None):
    """The FID Inception network, in eval mode: images in [-1, 1], any size, 1 or 3 channels -> (batch, 2048)
    features. weights: None (random, for tests), a path or a state dict laid out as FID_WEIGHTS_URL's file."""
    # the TF graph of 2015 is torchvision's Inception3 but for: the A, C and E blocks' pool branches average
    # without the zero padding, the last E block max-pools there, and the classifier has 1008 outputs
    from torchvision.models import inception as tv

    class PaddingFreePool:  # mixin for InceptionA/C/E: redo the pool branch the TF way
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)

        def _forward(self, x):
            return super()._forward(x)[:-1] + [self.branch_pool(self.pool(x))]

    class FIDInception(tv.Inception3):
        def forward(self, x):
            x = (x.float().expand(-1, 3, -1, -1) + 1) * 127.5  # grey -> RGB, and 8-bit values
            x = (tf1_resize(x, 299) - 128) / 128  # the graph's own resize and scaling
            for layer in list(self.children())[:-1]:  # everything up to the pooled features, not fc
                x = layer(x)
            return x.flatten(1)

    blocks = [tv.BasicConv2d, type("A", (PaddingFreePool, tv.InceptionA), {}), tv.InceptionB,
              type("C", (PaddingFreePool, tv.InceptionC), {}), tv.InceptionD,
              type("E", (PaddingFreePool, tv.InceptionE), {}), tv.InceptionAux]
    net = FIDInception(num_classes=1008, aux_logits=False, inception_blocks=blocks, init_weights=False)
    net.Mixed_7c.pool = nn.MaxPool2d(3, stride=1, padding=1)
    return (net if weights is None else load_weights(net, weights, "FID Inception")).eval().requires_grad_(False)

LPIPS_URLS = ("https://download.pytorch.org/models/vgg16-397923af.pth",  # VGG16 on ImageNet, torchvision's
              "https://raw.githubusercontent.com/richzhang/PerceptualSimilarity/master/lpips/weights/v0.1/vgg.pth")

def lpips_network(weights=None):
    """LPIPS v0.1 on VGG16, as lpips.LPIPS(net="vgg") computes it and with its layout: images in
    [-1, 1] -> distances. weights: None (random, for tests), a path or a state dict."""
    class LPIPS(nn.Module):
        def __init__(self):
            super().__init__()
            self.scaling_layer = nn.Module()  # [-1, 1] onto ImageNet's statistics
            self.scaling_layer.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
            self.scaling_layer.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
            vgg, ch = nn.Sequential(), 3  # torchvision's vgg16().features up to relu5_3, numbered as there
            for width in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512):
                vgg.extend([nn.MaxPool2d(2)] if width == "M" else [nn.Conv2d(ch, width, 3, padding=1), nn.ReLU()])
                ch = ch if width == "M" else width
            ends = (0, 4, 9, 16, 23, 30)  # slices (which keep the layers' numbers) end at relu1_2, 2_2, 3_3, 4_3, 5_3
            self.net = nn.ModuleDict({f"slice{k + 1}": vgg[a:b] for k, (a, b) in enumerate(zip(ends, ends[1:]))})
            convs = [nn.Conv2d(width, 1, 1, bias=False) for width in (64, 128, 256, 512, 512)]  # weights per channel
            self.lins = nn.ModuleList(nn.ModuleDict({"model": nn.Sequential(nn.Identity(), conv)}) for conv in convs)
            for k, lin in enumerate(self.lins):  # lpips holds each twice, as lins.<k> and lin<k>; Identity: its dropout
                self.add_module(f"lin{k}", lin)

        def forward(self, a, b):  # unit-normalised features' squared differences, weighed per channel
            x, distance = (torch.cat([a, b]) - self.scaling_layer.shift) / self.scaling_layer.scale, 0
            for layers, lin in zip(self.net.values(), self.lins):
                x = layers(x)
                fa, fb = (x / (x.square().sum(1, keepdim=True).sqrt() + 1e-10)).chunk(2)
                distance = distance + lin.model((fa - fb).square()).mean((2, 3))
            return distance.flatten()

    return (LPIPS() if weights is None else load_weights(LPIPS(), weights, "LPIPS")).eval().requires_grad_(False)

def lpips_distance(cfg):
    """The official distillation distance: LPIPS at 64x64 (bilinear, align_corners=True; grey as RGB), with
    --lpips-weights or torchvision's VGG16 and LPIPS v0.1's layers, downloaded once into <data-dir>/lpips."""
    weights = cfg.lpips_weights
    if weights is None:
        vgg, lin = (load_file(download(url, Path(cfg.data_dir) / "lpips", "the LPIPS weights", "--lpips-weights"),
                              "an LPIPS weights") for url in LPIPS_URLS)
        weights = lpips_network().state_dict()  # the layout, and the input scaling's constants
        weights.update({k: vgg["features." + k.split(".", 2)[2]] for k in weights if k.startswith("net.")})  # VGG16
        weights.update({k: lin[k.replace("lins.", "lin")] for k in weights if k.startswith("lin")})  # lins.<k>: lin<k>
    return compile_if(lpips_at_64(lpips_network(weights).to(cfg.device)), cfg.compile)

def lpips_at_64(net):
    """The distance net(a, b) of LPIPS on images resized to 64x64, as the official lpips_forward_wrapper(size=64)."""
    def distance(a, b):
        a, b = (F.interpolate(x.expand(-1, 3, -1, -1), size=64, mode="bilinear", align_corners=True) for x in (a, b))
        return net(a, b)
    return distance


# 16. Sampling and evaluation -------------------------------------------------
# Samples come from fixed noise, so every stage and sampler sees the same Z0. `eval` prints one
# row of the paper's table; the default toy run prints one per model of the pipeline.

def sample_flow(net, z, cfg, sampler):  # a flow v(x, t), solved by --sampler
    return sample_with(net, z, sampler, cfg.nfe, cfg.rtol, cfg.atol)

# What differs between the networks that the stages write, in one table: sample(net, z, cfg, sampler), how each
# turns noise z into (samples, NFE); name(nfe, sampler), its sampler in a table row; inputs(z, t), one call's inputs
# (for its MACs).
FLOW = types.SimpleNamespace(sample=sample_flow, name=lambda nfe, sampler: sampler, inputs=lambda z, t: (z, t))
STAGE_NETWORKS = {
    "teacher": FLOW,
    "reflow": FLOW,
    "distill": types.SimpleNamespace(sample=lambda net, z, cfg, sampler: (net(z), 1),
                                     name=lambda nfe, sampler: "generator", inputs=lambda z, t: (z,)),
    "traflow": types.SimpleNamespace(sample=lambda net, z, cfg, sampler: traflow_sample(net, z, cfg.nfe),
                                     name=lambda nfe, sampler: f"{nfe} jump" + "s" * (nfe > 1),
                                     inputs=lambda z, t: (z, t, t)),
}

def generate(net, stage, z, cfg, sampler=None):
    """Samples and NFE from a stage's frozen network: a flow by --sampler, the generator in one call, TraFlow in
    --nfe jumps."""
    return STAGE_NETWORKS[stage].sample(net, z, cfg, sampler or cfg.sampler)

def generate_all(net, stage, cfg, sampler=None):
    """cfg.num_samples samples from seeded noise, in batches of --pairs-batch, with a progress line where there are
    several; and the NFE."""
    z = fixed_noise(cfg, cfg.num_samples, "samples")
    parts = in_batches(z, cfg.pairs_batch, "[sample]", "samples") if len(z) > cfg.pairs_batch else [z]
    batches = [generate(net, stage, zb.to(cfg.device), cfg, sampler) for zb in parts]
    return torch.cat([b[0].cpu() for b in batches]), round(np.mean([b[1] for b in batches]))

def pick_stage(cfg):
    """--from, or the latest stage with a checkpoint."""
    return cfg.sample_from or next((s for s in reversed(FLOW_STAGES) if out_path(cfg, s).exists()), "teacher")

def sampler_name(stage, nfe, sampler):
    return STAGE_NETWORKS[stage].name(nfe, sampler)

def stage_sample(cfg):
    stage, tic = pick_stage(cfg), time.monotonic()
    x, nfe = generate_all(compile_if(load_stage_network(cfg, stage)[0], cfg.compile), stage, cfg)
    path = Path(cfg.out) / f"samples_{stage}.npy"  # not there, or --overwrite: see run_stage
    save_atomic(lambda f: np.save(f, x.numpy()), path)
    save_preview(x, path.with_suffix(".png"), cfg)
    print(f"[sample] {len(x)} samples from {stage} ({sampler_name(stage, nfe, cfg.sampler)}, NFE {nfe}) -> {path} "
          f"and {path.with_suffix('.png')} in {duration(time.monotonic() - tic)}")

def fid_metric(cfg, extractor=None):
    """fid(x): the FID of images x against the training set. Ready before the first sample: the Inception weights
    and the training set's statistics (--fid-stats, or computed once and cached in --data-dir)."""
    if extractor is None:
        extractor = fid_inception(cfg.fid_weights or download(FID_WEIGHTS_URL, Path(cfg.data_dir) / "fid",
                                                              "the FID Inception weights", "--fid-weights"))
    name = type(extractor).__name__.lower()  # in the cached statistics' file name
    extractor = compile_if(extractor.to(cfg.device), cfg.compile)

    @torch.no_grad()
    def features(images, what):  # of uint8 images or images in [-1, 1], with a progress line
        feats = [extractor(to_unit_range(x).to(cfg.device).clamp(-1, 1)).double().cpu()
                 for x in in_batches(images, cfg.pairs_batch, f"[fid] {what}:", "images")]
        return gaussian_stats(torch.cat(feats).numpy())
    if cfg.fid_stats:
        stats = Path(cfg.fid_stats)
    else:
        real = image_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.max_images, cfg.seed)
        stats = Path(cfg.data_dir) / (f"fid_stats_{cfg.dataset}_train_{cfg.image_size}px_{len(real)}_"
                                      f"{name}_tf1.npz")
        if not stats.exists():
            mu, sigma = features(real, f"{cfg.dataset} training set")
            save_atomic(lambda f: np.savez(f, mu=mu, sigma=sigma), stats)
            print(f"[fid] cached training-set statistics in {stats}")
    try:
        with np.load(stats) as npz:
            mu_real, sigma_real = npz["mu"], npz["sigma"]
    except (OSError, ValueError, KeyError) as err:
        raise UsageError(f"{stats} holds no FID statistics (an .npz of mu and sigma): {err}") from None
    # samples as 8-bit images, truncated, as the official evaluation makes them
    return lambda x: frechet_distance(*features((255 * (x.clamp(-1, 1) + 1) / 2).to(torch.uint8), "samples"),
                                      mu_real, sigma_real)

def laplacian_swd(x, y, max_images=1000, patches=128, seed=0):
    """PGGAN's multi-scale SWD between image sets (uint8 or in [-1, 1]), with no pretrained weights: at each
    level of a Laplacian pyramid down to 16x16, 7x7 patches at `patches` random places per image, each channel
    standardised over the set, compared by SW2; the mean over levels, x 1e3 as PGGAN reports it."""
    n, g = min(len(x), len(y), max_images), torch.Generator().manual_seed(seed)
    kernel = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16
    kernel = (kernel[:, None] * kernel).expand(x.shape[1], 1, 5, 5)

    def blur(im):
        return F.conv2d(F.pad(im, (2, 2, 2, 2), mode="reflect"), kernel, groups=im.shape[1])
    levels, im = [], torch.cat([to_unit_range(x[:n]), to_unit_range(y[:n])]).cpu()  # x, then y
    while im.shape[-1] > 16:  # the Laplacian pyramid, finest level first
        down, up = blur(im)[..., ::2, ::2], torch.zeros_like(im)
        up[..., ::2, ::2] = down
        levels, im = levels + [im - 4 * blur(up)], down
    distances = []
    for level in levels + [im]:
        i, j = (torch.randint(level.shape[-1] - 6, (n, patches), generator=g) for _ in range(2))
        sets = [s.unfold(2, 7, 1).unfold(3, 7, 1)[torch.arange(n)[:, None], :, i, j].flatten(0, 1).flatten(2)
                for s in level.split(n)]  # (n·patches, channels, 49) of x, and of y
        sets = [(d - d.mean((0, 2), keepdim=True)) / (d.std((0, 2), keepdim=True) + 1e-8) for d in sets]
        distances.append(sliced_wasserstein(*sets, num_projections=128, seed=seed))
    return 1e3 * float(np.mean(distances))

def count_macs(model, *inputs):
    """Multiply-accumulates per sample of model(*inputs), from torch's FLOP counter (2 FLOPs a MAC): `attention`
    inside attention blocks (q/k/v/output projections, both matrix products), `conv` and `linear` outside, `total`."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    flops, root = counter.get_flop_counts(), type(model).__name__  # {module name: {operation: FLOPs}}
    inside = [flops.get(f"{root}.{name}", {}) for name, m in model.named_modules() if isinstance(m, Attention)]

    def macs(ops, kind=""):
        return sum(n for op, n in ops.items() if kind in str(op)) // (2 * len(inputs[0]))
    total, attention = macs(flops["Global"]), sum(macs(ops) for ops in inside)
    conv = macs(flops["Global"], "convolution") - sum(macs(ops, "convolution") for ops in inside)
    return {"conv": conv, "linear": total - conv - attention, "attention": attention, "total": total}

def samples_per_second(sample_fn, z, repeats=3):
    """Throughput of sample_fn on the batch z: the best of a few timed runs, after a warm-up."""
    sync = torch.cuda.synchronize if z.is_cuda else lambda: None
    seconds = []
    for _ in range(repeats + 1):  # the first run is the warm-up
        tic = time.perf_counter()
        sample_fn(z)
        sync()
        seconds.append(time.perf_counter() - tic)
    return len(z) / min(seconds[1:])

def si(n):
    """12345678 -> '12.35M'."""
    return next(f"{n / 10**e:.2f}{u}" for e, u in ((9, "G"), (6, "M"), (3, "K"), (0, "")) if n >= 10**e or e == 0)

def evaluate(cfg, stage, net, sampler, method=None, fid=None):
    """One row of the paper's table (see print_table) for a stage's network and sampler, with FLOPs and
    MACs counting attention. On images fid = fid_metric(cfg), or None (--no-fid); SWD, against held-out images,
    needs no weights."""
    reference = (toy_data(cfg.dataset, cfg.num_samples, cfg.seed + 3) if cfg.toy
                 else image_dataset(cfg.dataset, cfg.data_dir, cfg.image_size, None, cfg.seed, train=False))
    sampling = compile_if(net, cfg.compile)  # net itself for its MACs and straightness, on other batch sizes
    x, nfe = generate_all(sampling, stage, cfg, sampler)
    row = {"method": method or f"{stage} ({sampler_name(stage, nfe, sampler)})", "params": num_params(net), "nfe": nfe}
    if cfg.toy:
        row["sw2"] = sliced_wasserstein(x, reference)
    else:
        row["swd"], row["fid"] = laplacian_swd(x, reference), None if fid is None else fid(x)
    z = fixed_noise(cfg, min(cfg.num_samples, cfg.pairs_batch), "eval").to(cfg.device)
    t = torch.full((1,), 0.5, device=cfg.device)
    macs = count_macs(net, *STAGE_NETWORKS[stage].inputs(z[:1], t))  # per call
    row["macs"] = macs["conv"] + macs["linear"]  # as the paper counts them: attention left out
    row["macs_with_attention"], row["flops"] = macs["total"], 2 * row["macs"]
    if stage in ("teacher", "reflow"):
        row["straightness"] = straightness(net, z[:1000])
    row["samples_per_s"] = samples_per_second(lambda zb: generate(sampling, stage, zb, cfg, sampler), z, repeats=2)
    return row

def print_table(cfg, rows):
    """The paper's table (#params, NFE, FID and SWD on images, MACs, straightness, samples/s); on a toy,
    SW2 against its floor (between two draws of the data: no model beats it), which it returns."""
    floor = sliced_wasserstein(toy_data(cfg.dataset, cfg.num_samples, cfg.seed + 4),
                               toy_data(cfg.dataset, cfg.num_samples, cfg.seed + 3)) if cfg.toy else None
    q1, q2 = ("SW2", "/floor") if cfg.toy else ("FID", "SWD")
    print(f"{'method':36s}{'#params':>10s}{'NFE':>6s}{q1:>9s}{q2:>8s}{'MACs':>9s}{'straight.':>10s}{'samples/s':>11s}")
    if cfg.toy:
        print(f"{'SW2 floor (two data draws)':36s}{'-':>10s}{'-':>6s}{floor:9.4f}{1:8.2f}")
    for r in rows:
        q = r.get("sw2", r.get("fid"))
        second = f"{q / floor:8.2f}" if cfg.toy else f"{r['swd']:8.1f}"
        print(f"{r['method']:36s}{r['params']:>10,}{r['nfe']:>6}{'-' if q is None else f'{q:.4f}':>9s}{second}"
              f"{si(r['macs']):>9s}{r.get('straightness', math.nan):10.4f}{r['samples_per_s']:11.0f}")
    return floor

def stage_eval(cfg, extractor=None):
    """The table row of one stage (--from) and sampler, printed and merged into <out>/metrics.json."""
    stage, path = pick_stage(cfg), Path(cfg.out) / "metrics.json"
    metrics, net = read_json(path, default={}), load_stage_network(cfg, stage)[0]  # all read before the work
    tic = time.monotonic()
    row = evaluate(cfg, stage, net, cfg.sampler, fid=None if cfg.toy or cfg.no_fid else fid_metric(cfg, extractor))
    floor = print_table(cfg, [row])
    if floor is not None:
        row["sw2_floor"] = floor
    key = f"{row['method']} nfe={row['nfe']}"
    if cfg.no_fid and not cfg.toy:  # said in the row and the file, apart from a row with FID: never a silent skip
        row["fid_not_computed"] = "--no-fid: the FID Inception weights were not read"
        print(f"[eval] FID not computed ({row['fid_not_computed']})")
        key += " no-fid"
    metrics[key] = row
    save_json(metrics, path)
    print(f"[eval] -> {path} in {duration(time.monotonic() - tic)}")
    return row

def stage_all(cfg):
    """The whole pipeline (a stage given by --teacher-ckpt or --init-ckpt is not trained); then on a toy,
    one table of all its models (also <out>/results.json) and their paths; on images, each stage's samples."""
    tic = time.monotonic()
    given = {"teacher": cfg.teacher_ckpt, "reflow": cfg.init_ckpt}
    for stage in (s for s in given if given[s]):  # checked before the work: the given checkpoints,
        load_stage_network(cfg, stage)
        print(f"[all] {stage}: using {given[stage]}")
    if cfg.distance == "lpips":  # and the LPIPS weights
        lpips_distance(cfg)
    for stage in ("teacher", "pairs", "reflow", "distill"):
        if not given.get(stage):
            run_stage(settings_for(cfg.given, stage))
    rank = world()[0]
    stop_processes()  # the report and the samples come from rank 0 alone
    if rank == 0 and cfg.toy:
        teacher, flow2, generator = (load_stage_network(cfg, s)[0] for s in FLOW_STAGES)
        rows = [evaluate(cfg, "teacher", teacher, "rk45", "teacher, 1-RF (RK45)"),
                evaluate(cfg, "teacher", teacher, "one_step", "teacher, 1-RF (one Euler step)"),
                evaluate(cfg, "reflow", flow2, "one_step", "2-rectified flow (one Euler step)"),
                evaluate(cfg, "distill", generator, None, "SlimFlow one-step generator")]
        floor = print_table(cfg, rows)
        save_json({"sw2_floor": floor, "rows": rows}, Path(cfg.out) / "results.json")
        plot_trajectories(cfg, teacher, flow2, generator)
    elif rank == 0:
        for stage, sampler in zip(FLOW_STAGES, ("rk45", "one_step", "one_step")):
            stage_sample(settings_for({**cfg.given, "sample_from": stage, "sampler": sampler}, "sample"))  # replaced
    print(f"[all] done in {duration(time.monotonic() - tic)}; outputs in {cfg.out}")

def plot_trajectories(cfg, teacher, flow2, generator, n=300):
    """Noise-to-data paths: curved for the teacher, nearly straight after reflow, one jump for the generator."""
    z, path = fixed_noise(cfg, n, "trajectories").to(cfg.device), Path(cfg.out) / "trajectories.png"
    save_preview({
        "1-rectified flow teacher (RK45)": rk45_sample(teacher, z, rtol=cfg.rtol, atol=cfg.atol, trajectory=True)[2],
        "2-rectified flow student (20 Euler steps)": euler_sample(flow2, z, 20, trajectory=True)[2],
        "SlimFlow one-step generator": torch.stack([z, generator(z)])}, path, cfg)
    print(f"[all] trajectories -> {path}")


# 17. Bench -------------------------------------------------------------------

def bench_step(net, objective, device, precision, compile):
    """step(batch): the training loop's own step of objective (clipping and EMA included), net compiled if asked."""
    model, opt = compile_if(net, compile), adamw(net, 1e-4, 0.0, device)
    ema = copy.deepcopy(net).requires_grad_(False)
    return lambda batch: training_step(model.train(), objective, batch, 0, net, ema, opt, lr=1e-4, lr_warmup=0,
                                       grad_clip=1.0, ema_decay=0.999, device=device, precision=precision)

def stage_bench(cfg):
    """Samples/s of the student (--model) and the teacher (--teacher-model): training steps at --batch-size, one-step
    and RK45 sampling, each also as a fraction of the device's matmul ceiling for its MACs (a training step ≈ 3 passes
    of 2·MACs FLOPs), and the student's distillation steps with --distance. One run, so rows compare: fp32 and, on
    a bf16 GPU, bf16 (or --precision); also with --compile, and with --channels-last in both layouts."""
    device, cuda = cfg.device, torch.device(cfg.device).type == "cuda"
    ceilings, n = {}, 8192 if cuda else 1024  # the device's dense matmul rate per precision, FLOP/s
    for precision in [cfg.precision] if "precision" in cfg.given else dict.fromkeys(["fp32", cfg.precision]):
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        ceilings[precision] = 2 * n**3 * samples_per_second(lambda _: a @ a, a[:1], repeats=10)  # "batch" of 1
    print(f"[bench] batch {cfg.batch_size} on {device} ({torch.cuda.get_device_name(device) if cuda else 'CPU'}); "
          "matmul ceiling " + ", ".join(f"{p} {c / 1e12:.2f} TFLOP/s" for p, c in ceilings.items()))
    print(f"{'model':13s}{'params':>8s}{'MACs':>8s}{'precision':>10s}{'compiled':>9s}{'layout':>7s}{'train/s':>10s}"
          f"{'of ceil.':>9s}{'distill/s':>10s}{'one step/s':>11s}{'of ceil.':>9s}{'RK45 NFE':>9s}{'RK45/s':>9s}")
    z = torch.randn(cfg.batch_size, *cfg.shape, device=device, generator=torch.Generator(device).manual_seed(cfg.seed))
    rows = []
    for name in dict.fromkeys([cfg.model, cfg.teacher_model]):
        torch.manual_seed(cfg.seed)
        start = to_device(build_model(name, cfg.shape), device)
        for p in start.parameters():  # untrained weights, but a non-zero field, so RK45 has work to do
            if not p.any():  # a zero-initialised weight or bias
                nn.init.normal_(p, std=0.02)
        params, macs = num_params(start), count_macs(start.eval(), z[:1], torch.rand(1, device=device))["total"]
        for precision, compiled, channels_last in itertools.product(ceilings, [False, True] if cfg.compile else [False],
                                                                    [False, True] if cfg.channels_last else [False]):
            torch.compiler.reset()  # compile afresh: every configuration recompiles the same forward
            net = to_device(copy.deepcopy(start), device, channels_last)  # the same weights: RK45 takes the same steps
            model = compile_if(net, compiled)
            with bf16_autocast(device, precision):
                one_step = samples_per_second(lambda z: one_step_sample(model.eval(), z), z)
                tic = time.perf_counter()
                nfe = rk45_sample(model, z, rtol=cfg.rtol, atol=cfg.atol)[1]  # one solve: RK45 is too slow to repeat
                rk45 = len(z) / (time.perf_counter() - tic)
            distill = None
            if name == cfg.model:  # its distillation: G = z + u, guided by a frozen v2, with --distance
                distance = (compile_if(lpips_at_64(lpips_network().to(device)), compiled) if cfg.distance == "lpips"
                            else DISTANCES[cfg.distance])  # LPIPS's random weights: the published ones' work
                objective = FlowGuidedDistillationLoss(compile_if(copy.deepcopy(net), compiled), distance,
                                                       cfg.reg_weight, cfg.target_form)
                step = bench_step(OneStepGenerator(copy.deepcopy(net)), objective, device, precision, compiled)
                distill = samples_per_second(lambda z: step((z, z.flip(0))), z)
            train = samples_per_second(bench_step(net, RectifiedFlowLoss(), device, precision, compiled), z)  # last
            of_ceiling = 2 * macs / ceilings[precision]  # seconds per sample at the ceiling
            layout = "NHWC" if channels_last else "NCHW"
            rows.append(dict(model=name, params=params, macs=macs, precision=precision, compiled=compiled,
                             layout=layout, train=train, train_of_ceiling=3 * train * of_ceiling, distill=distill,
                             one_step=one_step, one_step_of_ceiling=one_step * of_ceiling, rk45_nfe=nfe, rk45=rk45))
            print(f"{name:13s}{si(params):>8s}{si(macs):>8s}{precision:>10s}{('no', 'yes')[compiled]:>9s}{layout:>7s}"
                  f"{train:10.1f}{3 * train * of_ceiling:9.1%}{'-' if distill is None else f'{distill:.1f}':>10s}"
                  f"{one_step:11.1f}{one_step * of_ceiling:9.1%}{nfe:9d}{rk45:9.1f}", flush=True)
    one_step = max(r["one_step"] for r in rows if r["model"] == cfg.model)
    rk45 = max(r["rk45"] for r in rows if r["model"] == cfg.teacher_model)
    print(f"one-step sampling of {cfg.model} / RK45 sampling of {cfg.teacher_model}, fastest of each: "
          f"{one_step / rk45:.0f}x")
    recipe_hours(cfg, rows)
    return rows

def recipe_hours(cfg, rows):
    """The device time of --dataset's recipe (its pairs, steps, batch and losses) at the fastest rates measured:
    pairs by the teacher's RK45 (fp32, as the pairs stage runs it), reflow's and distillation's steps of the student;
    and the teacher's own training, which a published teacher saves. Said too: where the bench timed other settings."""
    def fastest(model, key):  # samples/s
        return max(r[key] for r in rows if r["model"] == model and r[key] is not None
                   and (key != "rk45" or r["precision"] == "fp32"))
    stages = ("teacher", "pairs", "reflow", "distill")
    recipe = {stage: settings_for({"dataset": cfg.dataset}, stage) for stage in stages}
    pairs, distill = recipe["pairs"], recipe["distill"]
    hours = {"pairs": pairs.num_pairs / fastest(cfg.teacher_model, "rk45") / 3600,
             **{stage: recipe[stage].steps * recipe[stage].batch_size / fastest(model, key) / 3600
                for stage, model, key in (("reflow", cfg.model, "train"), ("distill", cfg.model, "distill"),
                                          ("teacher", cfg.teacher_model, "train"))}}
    differs = [f"{name} {ours} (the recipe's {theirs})" for name, ours, theirs in (
        ("batch", cfg.batch_size, distill.batch_size), ("RK45 batch", cfg.batch_size, pairs.pairs_batch),
        ("rtol", cfg.rtol, pairs.rtol), ("atol", cfg.atol, pairs.atol), ("distance", cfg.distance, distill.distance),
        ("target form", cfg.target_form, distill.target_form), ("lambda", cfg.reg_weight, distill.reg_weight))
        if ours != theirs]
    took = {stage: duration(h * 3600) for stage, h in hours.items()}
    print(f"[bench] the {cfg.dataset} recipe at these rates: pairs {took['pairs']} ({pairs.num_pairs:,} by RK45), "
          f"reflow {took['reflow']} ({recipe['reflow'].steps:,} steps), distill {took['distill']} ({distill.steps:,} "
          f"steps): {duration(3600 * (sum(hours.values()) - hours['teacher']))} from a given teacher; training the "
          f"teacher ({recipe['teacher'].steps:,} steps) adds {took['teacher']}"
          + (f". Timed with {', '.join(differs)}" if differs else ""))
    return hours


# 18. Settings and the command line -------------------------------------------
# One settings object per stage, built once and never changed: the defaults of every run, then those of the
# data's kind (2-D toy, image, and the `shapes` demo) and of the stage, then the flags given, which always win.
# The image defaults are the official CIFAR10 settings.

DEFAULTS = {
    "all": dict(dataset="8gaussians", stage="all", out=None, data_dir="data", image_size=32, max_images=None,
                teacher_ckpt=None, init_ckpt=None, weight_decay=0.0, seed=0, device="auto", precision=None,
                compile=False, channels_last=False, resume=False, overwrite=False, rtol=1e-5, atol=1e-5,
                beta_schedule="linear", distance="l2", reg_weight=1.0, target_form="official", traflow_from="teacher",
                lambda_vel=1.0, lambda_cons=1.0, traflow_phases=0, traflow_midpoint="student",
                traflow_target="stopgrad", sampler="rk45", nfe=1, sample_from=None, no_fid=False, fid_weights=None,
                fid_stats=None, lpips_weights=None),
    "toy": dict(teacher_model="mlp-256x3", model="mlp-96x3", batch_size=256, lr=1e-3, lr_warmup=100, grad_clip=1.0,
                ema_decay=0.999, num_pairs=20_000, pairs_batch=20_000, num_samples=10_000, log_every=500,
                ckpt_every=1000, preview_every=0, anneal_steps=1000, flip=False,
                steps=dict(teacher=3000, reflow=3000, distill=2000, traflow=2000)),
    "image": dict(teacher_model="rf-61.8m", model="slim-15.7m", batch_size=128, lr=2e-4, lr_warmup=5000,
                  grad_clip=1.0, ema_decay=0.999999, num_pairs=50_000, pairs_batch=500, num_samples=64, log_every=100,
                  ckpt_every=5000, preview_every=5000, anneal_steps=300_000, distance="lpips", flip=True,
                  steps=dict(teacher=800_000, reflow=500_000, distill=200_000, traflow=200_000)),
    "image distill": dict(flip=False, lr_warmup=0),  # fine-tuning v2, as the official code does
    "image eval": dict(num_samples=50_000),  # the paper's FID protocol
    "shapes": dict(teacher_model="unet-tiny", model="unet-micro", batch_size=64, lr=1e-3, lr_warmup=100,
                   ema_decay=0.999, num_pairs=2000, pairs_batch=500, log_every=50, ckpt_every=500, preview_every=500,
                   anneal_steps=500, distance="l2", steps=dict(teacher=2000, reflow=1000, distill=500, traflow=500)),
}

class Settings(types.SimpleNamespace):
    """Every setting of one stage's run, read-only; `given` holds the flags the user gave."""

    def __setattr__(self, name, value):
        raise AttributeError(f"settings are never changed ({name}); build others with settings_for()")

def settings_for(given, stage=None):
    """The settings of `stage` (default: the one given), built from `given` (flag name -> value) and checked."""
    stage = stage or given.get("stage", DEFAULTS["all"]["stage"])
    dataset = given.get("dataset", DEFAULTS["all"]["dataset"])
    toy = dataset in TOY_DATASETS
    kind = "toy" if toy else "image"
    merged = {**DEFAULTS["all"], **DEFAULTS[kind], **DEFAULTS.get(dataset, {}), **DEFAULTS.get(f"{kind} {stage}", {})}
    merged["steps"] = merged["steps"].get(stage, 1)
    merged.update(given, stage=stage, toy=toy)
    merged["out"] = merged["out"] or str(Path("runs") / dataset)
    merged["device"] = resolve_device(merged["device"])
    merged["precision"] = resolve_precision(merged["precision"], merged["device"])
    size = merged["image_size"]
    merged["shape"] = (2,) if toy else (1 if dataset in ("mnist", "fashion_mnist") else 3, size, size)
    if toy and merged["distance"] == "lpips":
        raise UsageError("--distance lpips is for images; use l2 or huber on 2-D data")
    if merged["compile"] and stage == "traflow":  # seen on the CPU with torch 2.14: recompiles, then a graph break
        raise UsageError("--compile: torch.compile cannot trace TraFlow's forward-mode derivative (torch.func.jvp) "
                         "and falls back to eager, recompiling; run traflow without it")
    if merged["channels_last"] and stage == "traflow":
        raise UsageError("--channels-last: TraFlow's forward-mode derivative fails through GroupNorm in that layout "
                         "in some PyTorch releases (2.11); run traflow without it")
    if merged["resume"] and merged["overwrite"]:
        raise UsageError("--resume continues a stage and --overwrite starts it over: pass one of them")
    for flag in ("teacher-model", "model"):  # a preset of the data's kind, which can halve the image evenly
        name, presets = merged[flag.replace("-", "_")], MLP_PRESETS if toy else PRESETS
        if name not in presets:
            raise UsageError(f"--{flag} {name} does not fit {kind} data; choose from {', '.join(presets)}")
        multiple = 1 if toy else 2 ** (len(presets[name]["ch_mult"]) - 1)  # the U-Net halves it once per level
        if not toy and (size % multiple or size < 8):
            raise UsageError(f"--image-size {size}: {name} needs a multiple of {multiple}, at least 8")
    return Settings(**merged, given=types.MappingProxyType(dict(given)))

def number(kind, strict=True, below=math.inf):
    """An argparse type: a finite `kind` > 0 (strict) or >= 0, and below `below`."""
    need = ">= 0" if not strict else "a positive integer" if kind is int else "positive"
    need = f"in [0, {below})" if below < math.inf else f"{need} and finite" if kind is float else need
    def parse(text):
        value = kind(text)
        if not (0 <= value < below and (value > 0 or not strict)):  # NaN fails it; ints of any size compare exactly
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse says "invalid int value: 'x'"
    return parse

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2 (through main), not a usage dump
        raise UsageError(message)

def parse_args(argv=None):
    """The command line's settings. The defaults live in DEFAULTS: argparse records only the flags given."""
    count, count_or_0, switch = number(int), number(int, strict=False), dict(action="store_true")
    positive, at_least_0, fraction = number(float), number(float, strict=False), number(float, strict=False, below=1)
    flags = [  # (flag, its type, or its choices, or other arguments of add_argument; help)
        ("--dataset", TOY_DATASETS + IMAGE_DATASETS, "default 8gaussians"), ("--stage", tuple(STAGES), "default all"),
        ("--out", str, "run directory (default runs/<dataset>)"),
        ("--data-dir", str, "where image datasets are downloaded or read (default data)"),
        ("--image-size", count, "default 32"), ("--max-images", count, "use at most this many training images"),
        ("--flip", dict(action=argparse.BooleanOptionalAction), "random horizontal flips (default on for images)"),
        ("--teacher-model", str, f"teacher preset: {', '.join([*PRESETS, *MLP_PRESETS])}"),
        ("--model", str, "student preset (reflow and distill)"),
        ("--teacher-ckpt", str, "teacher checkpoint (path or URL) instead of <out>/teacher.pt, ours or official"),
        ("--init-ckpt", str, "2-rectified flow to distill (path or URL) instead of <out>/reflow.pt, ours or official"),
        ("--steps", count, "training steps of the stage (all: of every stage)"), ("--batch-size", count, None),
        ("--lr", positive, None), ("--lr-warmup", count_or_0, "learning-rate warm-up steps"),
        ("--weight-decay", at_least_0, None), ("--grad-clip", at_least_0, "max gradient norm (0: off)"),
        ("--ema-decay", fraction, None), ("--seed", number(int, strict=False, below=2**32), None),
        ("--device", str, "auto (default), cpu, cuda, cuda:N or mps"),
        ("--precision", ("fp32", "bf16"), "bf16 autocast (default on GPUs with bf16)"),
        ("--compile", switch, "torch.compile the networks a stage runs (not with --stage traflow)"),
        ("--channels-last", switch, "U-Nets in the channels_last memory layout (default NCHW; not with traflow)"),
        ("--resume", switch, "continue the stage's checkpoint exactly"),
        ("--overwrite", switch, "start the stage over, replacing its output"),
        ("--log-every", count, None), ("--ckpt-every", count, None),
        ("--preview-every", count_or_0, "sample previews every N steps (0: off)"),
        ("--num-pairs", count, "reflow pairs to generate"),
        ("--pairs-batch", count, "batch size of RK45 pair generation (one shard) and of sampling"),
        ("--rtol", positive, "RK45 relative tolerance (1e-5)"), ("--atol", positive, "RK45 absolute tolerance (1e-5)"),
        ("--anneal-steps", count_or_0, "Annealing Reflow's K (0: plain reflow)"),
        ("--beta-schedule", BETA_SCHEDULES, "default linear"),
        ("--distance", (*DISTANCES, "lpips"), "default l2"),
        ("--reg-weight", at_least_0, "lambda of the 2-rectified-flow regularization (0: naive distillation)"),
        ("--target-form", TARGET_FORMS,
         "the regularization target's first step along the student's u (official, default) or v2 (paper)"),
        ("--traflow-from", ("teacher", "reflow"), "the flow TraFlow distills and starts from"),
        ("--lambda-vel", at_least_0, "TraFlow velocity loss weight (default 1)"),
        ("--lambda-cons", at_least_0, "TraFlow consistency loss weight (default 1)"),
        ("--traflow-phases", count_or_0,
         "K > 0: consistency alone for K steps, then output + velocity (default 0: all at once)"),
        ("--traflow-midpoint", TRAFLOW_MIDPOINTS, "default student"),
        ("--traflow-target", ("stopgrad", "ema"), "default stopgrad"), ("--sampler", SAMPLERS, "default rk45"),
        ("--nfe", count, "euler: N steps; heun: (N+1)//2 steps, NFE 2·steps - 1; traflow: N jumps"),
        ("--from", dict(dest="sample_from", choices=tuple(STAGE_NETWORKS)),
         "stage to sample or evaluate (default: latest)"),
        ("--num-samples", count, "samples to draw (eval on images: 50,000)"),
        ("--no-fid", switch, "eval on images without FID, so without its Inception weights (offline); the rest "
                             "of the row as ever"),
        ("--fid-weights", str, "FID Inception weights (default: downloaded once into <data-dir>/fid)"),
        ("--fid-stats", str, "the training set's FID statistics, an .npz of mu and sigma (default: computed)"),
        ("--lpips-weights", str, "LPIPS weights, laid out as lpips.LPIPS(net='vgg')'s (default: downloaded)"),
    ]
    p = Parser(description="SlimFlow: small one-step generators with rectified flow.",
               argument_default=argparse.SUPPRESS)
    for flag, kind, help in flags:
        how = kind if isinstance(kind, dict) else dict(choices=kind) if isinstance(kind, tuple) else dict(type=kind)
        p.add_argument(flag, **how, help=help)
    return settings_for(vars(p.parse_args(argv)))

def resolve_device(name):
    """A device name that works here; under torchrun, a GPU means this process's own one."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.split(":")[0] == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        torch.empty(0, device=name)
    except Exception:
        raise UsageError(f"device {name!r} is not available here") from None
    if torch.device(name).type == "cuda":  # TF32 matmuls and convolutions: free speed on Ampere and later
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return name

def resolve_precision(precision, device):
    """bf16 autocast by default on GPUs that support it, float32 elsewhere."""
    return precision or ("bf16" if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported() else "fp32")

STAGES = {"teacher": stage_teacher, "pairs": stage_pairs, "reflow": stage_reflow, "distill": stage_distill,
          "traflow": stage_traflow, "sample": stage_sample, "eval": stage_eval, "bench": stage_bench, "all": stage_all}

def run_stage(cfg):
    """One stage, after the checks that need no work: a finished stage is never silently replaced."""
    path = out_path(cfg, cfg.stage)
    if cfg.stage in STAGE_FILES and path.exists() and not (cfg.resume or cfg.overwrite):
        raise UsageError(f"{path} exists; pass --resume to continue it or --overwrite to start over")
    if cfg.stage == "sample" and not cfg.overwrite:
        if (samples := Path(cfg.out) / f"samples_{pick_stage(cfg)}.npy").exists():
            raise UsageError(f"{samples} exists; pass --overwrite to replace it")
    torch.manual_seed(cfg.seed)  # the networks' initial weights
    if cfg.compile:  # each stage compiles its networks afresh: --stage all runs every stage in one process, and
        torch.compiler.reset()  # dynamo keeps 8 compiled versions of a function (of networks, shapes), then runs eager
    return STAGES[cfg.stage](cfg)

def lock_run_directory(cfg):
    """Make --out, and lock it for this run: a second run on it is refused, naming this one's process. The lock
    is held by the open file, so it goes with the process however that ends."""
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / ".lock", "a+")
    except OSError as err:
        raise UsageError(f"cannot write to --out {out} ({err.strerror})") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        holder = (out / ".lock").read_text().strip() or "?"
        raise UsageError(f"{out} is in use by another slimflow run (process {holder}); wait for it to end or pass "
                         f"another --out") from None
    lock.truncate(0)
    print(os.getpid(), file=lock, flush=True)
    return lock

def main(argv=None):
    lock = None
    try:
        cfg = parse_args(argv)
        if cfg.stage != "bench" and fcntl and int(os.environ.get("RANK", 0)) == 0:  # rank 0 writes in --out
            lock = lock_run_directory(cfg)
        if cfg.stage not in ("sample", "eval", "bench"):
            start_processes(cfg.device)
        elif int(os.environ.get("RANK", 0)) > 0:  # under torchrun, rank 0 alone samples, evaluates, benchmarks
            return 0
        run_stage(cfg)
    except (UsageError, TrainingError, OSError) as err:  # bad input: exit status 2; a fault (a full disk): 1
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt as err:  # Ctrl-C: what is kept, and how to go on
        print(f"error: interrupted. {err}", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:  # sampling, evaluation or the bench (training and pairs say more: see there)
        flag = "--batch-size" if cfg.stage == "bench" else "--pairs-batch"  # the bench's batch, or sampling's
        print(f"error: out of memory on {device_memory(cfg.device)}: lower {flag}", file=sys.stderr)
        return 1
    finally:
        stop_processes()
        if lock:
            lock.close()
    return 0

if __name__ == "__main__":
    sys.exit(main())
