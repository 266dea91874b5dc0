"""EDM's ablation sampler: time-step discretisation, noise schedule and signal scaling chosen apart.

``generate.py --disc vp|ve|iddpm|edm --schedule vp|ve|linear --scaling vp|none --solver euler|heun``
(Karras et al. 2022, Table 1) integrates the probability-flow ODE written in a time variable t with

    x(t) = s(t) (x0 + sigma(t) eps),   dx/dt = (sigma'/sigma + s'/s) x - sigma' s / sigma * D(x / s; sigma),

where D is the denoiser. Three choices, each one function here:

- discretisation (:func:`sigma_steps`): the noise levels sigma_0 > ... > sigma_{N-1} visited,
  ``vp`` (uniform t in [1, eps_s] of the VP SDE refitted to [sigma_min, sigma_max]), ``ve`` (geometric
  in sigma^2), ``iddpm`` (the cosine schedule's 1000 levels, N picked evenly), ``edm`` (uniform in
  sigma^(1/rho));
- schedule (:class:`Schedule`): sigma(t) with its derivative and inverse, ``vp``, ``ve`` (sqrt t) or
  ``linear`` (sigma = t);
- scaling: s(t) = 1/sqrt(1 + sigma(t)^2) (``vp``) or 1 (``none``).

The time steps are t_i = sigma^-1(round_sigma(sigma_i)) plus t_N = 0. With ``edm``/``linear``/``none``
and Heun this is ``sampling.edm_sampler`` (the same steps, the same float64 arithmetic in another
order). ``alpha`` places Heun's second evaluation (1: at the end of the step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DISCRETIZATIONS",
    "SCALINGS",
    "SCHEDULES",
    "SOLVERS",
    "Schedule",
    "ablation_sampler",
    "default_sigma_range",
    "schedule",
    "sigma_steps",
    "vp_sigma",
]

DISCRETIZATIONS = ("vp", "ve", "iddpm", "edm")
SCHEDULES = ("vp", "ve", "linear")
SCALINGS = ("vp", "none")
SOLVERS = ("euler", "heun")
VP_BETA_D, VP_BETA_MIN = 19.9, 0.1  # the VP SDE of Song et al., as in EDM


def vp_sigma(t: Any, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> Any:
    """sigma(t) of the VP SDE: sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (floats or tensors)."""
    e = 0.5 * beta_d * t**2 + beta_min * t
    return (torch.exp(e) - 1).sqrt() if isinstance(e, torch.Tensor) else math.sqrt(math.exp(e) - 1)


def default_sigma_range(discretization: str, epsilon_s: float = 1e-3) -> tuple[float, float]:
    """EDM's default (sigma_min, sigma_max) of each discretisation (before clamping to the network)."""
    return {
        "vp": (vp_sigma(epsilon_s), vp_sigma(1.0)),
        "ve": (0.02, 100.0),
        "iddpm": (0.002, 81.0),
        "edm": (0.002, 80.0),
    }[discretization]


def _vp_fit(sigma_min: float, sigma_max: float, epsilon_s: float) -> tuple[float, float]:
    """(beta_d, beta_min) of the VP SDE whose sigma(epsilon_s) = sigma_min and sigma(1) = sigma_max."""
    beta_d = 2 * (math.log(sigma_min**2 + 1) / epsilon_s - math.log(sigma_max**2 + 1)) / (epsilon_s - 1)
    return beta_d, math.log(sigma_max**2 + 1) - 0.5 * beta_d


def _iddpm_levels(M: int, C_1: float, C_2: float, device: torch.device) -> torch.Tensor:
    """The M + 1 noise levels u_0 < ... < u_M = 0 ... of iDDPM's cosine schedule, as EDM derives them:
    u_{j-1} = sqrt((u_j^2 + 1) / max(abar_{j-1} / abar_j, C_1) - 1), u_M = 0 (a running product here)."""
    j = torch.arange(M + 1, dtype=torch.float64, device=device)
    alpha_bar = torch.sin(0.5 * math.pi * j / M / (C_2 + 1)) ** 2
    ratio = (alpha_bar[:-1] / alpha_bar[1:]).clip(min=C_1)  # ratio[j-1] for j = 1..M
    # u_{j-1}^2 + 1 = prod_{k=j..M} 1 / ratio[k-1]
    tail = torch.flip(torch.cumprod(torch.flip(1 / ratio, [0]), 0), [0])
    return torch.cat([(tail - 1).clamp(min=0).sqrt(), torch.zeros(1, dtype=torch.float64, device=device)])


def sigma_steps(
    discretization: str,
    num_steps: int,
    sigma_min: float,
    sigma_max: float,
    rho: float = 7.0,
    epsilon_s: float = 1e-3,
    C_1: float = 0.001,
    C_2: float = 0.008,
    M: int = 1000,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The ``num_steps`` noise levels (float64, decreasing, without the final 0) of a discretisation."""
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {discretization!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / (num_steps - 1) if num_steps > 1 else i
    if discretization == "vp":
        beta_d, beta_min = _vp_fit(sigma_min, sigma_max, epsilon_s)
        return vp_sigma(1 + frac * (epsilon_s - 1), beta_d, beta_min)
    if discretization == "ve":
        return (sigma_max**2 * (sigma_min**2 / sigma_max**2) ** frac).sqrt()
    if discretization == "iddpm":
        u = _iddpm_levels(M, C_1, C_2, torch.device(device))
        kept = u[(u >= sigma_min) & (u <= sigma_max)]
        if len(kept) == 0:
            raise ValueError(f"no iDDPM level lies in [{sigma_min}, {sigma_max}]")
        return kept[((len(kept) - 1) / max(num_steps - 1, 1) * i).round().to(torch.int64)]
    return (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


@dataclass(frozen=True)
class Schedule:
    """sigma(t), its derivative and its inverse (tensors of float64)."""

    sigma: Callable[[torch.Tensor], torch.Tensor]
    deriv: Callable[[torch.Tensor], torch.Tensor]
    inv: Callable[[torch.Tensor], torch.Tensor]


def schedule(name: str, beta_d: float = VP_BETA_D, beta_min: float = VP_BETA_MIN) -> Schedule:
    """The noise schedule ``vp`` (with the given betas), ``ve`` (sqrt t) or ``linear`` (sigma = t)."""
    if name == "vp":

        def sigma(t: torch.Tensor) -> torch.Tensor:
            return vp_sigma(t, beta_d, beta_min)

        def deriv(t: torch.Tensor) -> torch.Tensor:
            s = sigma(t)
            return 0.5 * (beta_min + beta_d * t) * (s + 1 / s)

        def inv(s: torch.Tensor) -> torch.Tensor:
            return ((beta_min**2 + 2 * beta_d * (s**2 + 1).log()).sqrt() - beta_min) / beta_d

        return Schedule(sigma, deriv, inv)
    if name == "ve":
        return Schedule(lambda t: t.sqrt(), lambda t: 0.5 / t.sqrt(), lambda s: s**2)
    if name == "linear":
        return Schedule(lambda t: t, lambda t: torch.ones_like(t), lambda s: s)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


@torch.no_grad()
def ablation_sampler(
    net: Callable[..., torch.Tensor],
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    num_steps: int = 18,
    sigma_min: float | None = None,     # None: the discretisation's default (default_sigma_range)
    sigma_max: float | None = None,
    rho: float = 7.0,
    solver: str = "heun",
    discretization: str = "edm",
    schedule_name: str = "linear",
    scaling: str = "none",
    epsilon_s: float = 1e-3,
    C_1: float = 0.001,
    C_2: float = 0.008,
    M: int = 1000,
    alpha: float = 1.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    noise: Any = None,                  # sampling.SeedNoise for the churn noise (needed if S_churn > 0)
) -> torch.Tensor:  # fmt: skip
    """EDM's generalised sampler (``generate.py``'s ``ablation_sampler``): float64 samples (N, C, H, W)
    from standard-normal ``latents``, with the given discretisation, schedule, scaling and solver."""
    if solver not in SOLVERS or scaling not in SCALINGS:
        raise ValueError(f"solver must be one of {SOLVERS} and scaling one of {SCALINGS}")
    if S_churn > 0 and noise is None:
        raise ValueError("S_churn > 0 needs noise=SeedNoise(seeds, device) for the churn noise")
    lo, hi = default_sigma_range(discretization, epsilon_s)
    sigma_min = max(lo if sigma_min is None else sigma_min, float(getattr(net, "sigma_min", 0.0)))
    sigma_max = min(hi if sigma_max is None else sigma_max, float(getattr(net, "sigma_max", math.inf)))
    dev = latents.device
    levels = sigma_steps(discretization, num_steps, sigma_min, sigma_max, rho, epsilon_s, C_1, C_2, M, dev)
    sched = schedule(schedule_name, *_vp_fit(sigma_min, sigma_max, epsilon_s))
    if scaling == "vp":
        s = lambda t: 1 / (1 + sched.sigma(t) ** 2).sqrt()
        s_deriv = lambda t: -sched.sigma(t) * sched.deriv(t) * s(t) ** 3
    else:
        s = lambda t: torch.ones_like(t)
        s_deriv = lambda t: torch.zeros_like(t)
    round_sigma = getattr(net, "round_sigma", lambda x: x)

    def rounded(sig: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(round_sigma(sig)).to(device=dev, dtype=torch.float64)

    def slope(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sig, ds = sched.sigma(t), sched.deriv(t)
        denoised = net(x / s(t), sig, class_labels).to(torch.float64)
        return (ds / sig + s_deriv(t) / s(t)) * x - ds * s(t) / sig * denoised

    t_steps = torch.cat([sched.inv(rounded(levels)), torch.zeros(1, dtype=torch.float64, device=dev)])
    x_next = latents.to(torch.float64) * (sched.sigma(t_steps[0]) * s(t_steps[0]))
    for i in range(num_steps):
        x_cur, t_cur, t_next = x_next, t_steps[i], t_steps[i + 1]
        # Churn: raise the noise level to sigma(t_hat), as EDM Algorithm 2.
        sig_cur = sched.sigma(t_cur)
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= float(sig_cur) <= S_max else 0.0
        t_hat = sched.inv(rounded(sig_cur + gamma * sig_cur))
        x_hat = s(t_hat) / s(t_cur) * x_cur
        if S_churn > 0:
            extra = (sched.sigma(t_hat) ** 2 - sig_cur**2).clip(min=0).sqrt()
            x_hat = x_hat + extra * s(t_hat) * S_noise * noise.randn_like(x_cur)
        # Euler step, then Heun's correction except on the last step.
        h = t_next - t_hat
        d_cur = slope(x_hat, t_hat)
        if solver == "euler" or i == num_steps - 1:
            x_next = x_hat + h * d_cur
        else:
            t_prime = t_hat + alpha * h
            d_prime = slope(x_hat + alpha * h * d_cur, t_prime)
            x_next = x_hat + h * ((1 - 1 / (2 * alpha)) * d_cur + 1 / (2 * alpha) * d_prime)
    return x_next
