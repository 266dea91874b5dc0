"""Jacobian of a denoiser and its effective rank (P2, Fig. 3).

The denoiser D(x; sigma) maps an image to an image, so its Jacobian at one point is a square
``n x n`` matrix with ``n = C*H*W`` (pixels flattened in C order, ``x.reshape(N, -1)``).
:func:`denoiser_jacobian` computes it at a batch of points with batched vector-Jacobian (or
Jacobian-vector) products, :func:`effective_rank` turns singular values into a rank, and
:func:`rank_profile` tabulates rank against noise level, on a sigma grid or along sampling
trajectories. It is made of two point generators, :func:`sigma_grid_points` and
:func:`trajectory_points` (which visits each point through the sampler's callback, so no path is
held in memory), and one :class:`RankTable` that turns points into rows.

What the authors' ``edm/jacobian.py`` does (huijieZH/Diffusion-Model-Generalizability), which
:func:`rank_profile` with ``trajectory=True`` reproduces:

- one standard-normal latent (unseeded ``torch.randn``); the 18-step EDM Heun sampler (sigma
  80 -> 0.002, rho 7, no churn, levels clamped to the net's range and rounded by ``round_sigma``);
- the Jacobian of ``D`` itself (not of ``D - I`` nor of the score) at the point ``x_i`` where each
  step ``i = 0..17`` starts, with ``sigma = t_i``: 18 points, SNR ``1/t_i`` from 0.0125 to 500;
  the final sample (sigma 0) is not used;
- the full Jacobian with ``torch.autograd.functional.jacobian`` (one backward pass per output);
  rows and columns in (H, W, C) order, a permutation that leaves singular values unchanged;
- singular values of ``J`` by SVD in float64 (the input ``x_i`` is float64, so the Jacobian is
  float64, though the network computes in float32), then the rank rule of :func:`effective_rank`
  (``'authors'``) with ratio 0.99;
- the network is called without class labels even for conditional networks (EDM then feeds zero
  labels). Here ``class_labels`` is passed through as given; pass ``None`` to match them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from nbhelpers.sampling import SeedNoise, edm_sampler

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "AUTHORS_SNR_GRID",
    "RANK_RULES",
    "denoiser_jacobian",
    "effective_rank",
    "jacobian_singular_values",
    "rank_profile",
    "RankTable",
    "sigma_grid_points",
    "trajectory_points",
]

AUTHORS_SNR_GRID = (500.0, 125.0, 50.0, 10.0, 1.67, 0.91, 0.3, 0.12, 0.08, 0.04, 0.02, 0.01)
"""SNR values 1/sigma on the x-axis of P2 Fig. 3, high to low; ``sigma = 1/SNR``. They are rounded
labels near the SNRs of the 18-step schedule that the authors' script visits (500, 133, 43.6,
16.7, 7.17, 3.37, 1.71, 0.92, 0.52, 0.31, 0.19, 0.12, 0.077, 0.052, 0.035, 0.025, 0.017, 0.013)."""

RANK_RULES: tuple[str, ...] = ("authors", "energy")

_METHODS = ("auto", "vjp", "jvp")
_TRANSFORM_ERRORS = (RuntimeError, NotImplementedError, TypeError)

# ----------------------------------------------------------------------------
# Helpers.


@contextlib.contextmanager
def _eval_mode(net: Callable) -> Iterator[None]:
    """Put every submodule of ``net`` in eval mode (dropout off), restoring each flag afterwards."""
    if not isinstance(net, torch.nn.Module):
        yield
        return
    flags = [(m, m.training) for m in net.modules()]
    for m, _ in flags:
        m.training = False
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _module_device(net: Callable) -> torch.device | None:
    if isinstance(net, torch.nn.Module):
        for t in list(net.parameters()) + list(net.buffers()):
            return t.device
    return None


def _sigma_vector(sigma, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``sigma`` (float, 0-d, (B,) or (B,1,1,1)) as a (B,) tensor."""
    s = torch.as_tensor(sigma, dtype=dtype, device=device)
    if s.ndim == 0:
        s = s.expand(batch)
    elif s.numel() == batch and (s.ndim == 1 or all(d == 1 for d in s.shape[1:])):
        s = s.reshape(batch)
    else:
        raise ValueError(
            f"sigma must be a scalar or hold one value per point ({batch}), got shape {tuple(s.shape)}"
        )
    if not bool(torch.all(s > 0)):
        raise ValueError("sigma must be positive: the Jacobian at sigma = 0 is not defined for a denoiser")
    return s.contiguous()


def _default_chunk_size(n: int, batch: int, device: torch.device) -> int:
    """Basis vectors per vectorised pass, from a budget of image-sized passes in flight that shrinks
    with n (a proxy for activation size): on CPU about 65536 / n (bigger batches lose cache locality;
    measured best for DDPM++ nets at 3x8x8 and 3x16x16), on accelerators about 2**20 / n."""
    budget = 65536 if device.type == "cpu" else 1 << 20
    in_flight = min(4096, max(16, budget // n))
    return max(1, min(n, in_flight // max(batch, 1)))


def _basis(start: int, stop: int, batch: int, shape: torch.Size, dtype, device) -> torch.Tensor:
    """Unit vectors e_start..e_{stop-1}, each repeated for every point: (stop-start, B, *shape)."""
    n = math.prod(shape)
    eye = torch.zeros(stop - start, n, dtype=dtype, device=device)
    eye[torch.arange(stop - start, device=device), torch.arange(start, stop, device=device)] = 1
    return eye[:, None, :].expand(stop - start, batch, n).reshape(stop - start, batch, *shape).contiguous()


# ----------------------------------------------------------------------------
# Jacobian engines. Each fills J (B, n, n) with J[b, i, j] = d D(x_b)_i / d (x_b)_j. They use that a
# denoiser treats the points of a batch independently (true in eval mode: GroupNorm and attention
# act per sample), so one VJP with the cotangent e_i on every point yields row i of all B Jacobians.


def _jac_func_vjp(f, x: torch.Tensor, jac: torch.Tensor, chunk: int) -> None:
    """Reverse mode: one forward pass, then vmap'ed VJPs over chunks of basis vectors (rows)."""
    batch, n = jac.shape[0], jac.shape[1]
    _, vjp_fn = torch.func.vjp(f, x)
    batched = torch.func.vmap(vjp_fn)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        (rows,) = batched(_basis(start, stop, batch, x.shape[1:], x.dtype, x.device))
        jac[:, start:stop, :] = rows.reshape(stop - start, batch, n).transpose(0, 1)


def _jac_func_jvp(f, x: torch.Tensor, jac: torch.Tensor, chunk: int) -> None:
    """Forward mode: vmap'ed JVPs over chunks of basis vectors (columns)."""
    batch, n = jac.shape[0], jac.shape[1]
    tangent_out = torch.func.vmap(lambda v: torch.func.jvp(f, (x,), (v,))[1])
    with warnings.catch_warnings():
        # torch's forward-AD decompositions script themselves on first use; not our concern.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            cols = tangent_out(_basis(start, stop, batch, x.shape[1:], x.dtype, x.device))
            jac[:, :, start:stop] = cols.reshape(stop - start, batch, n).permute(1, 2, 0)


def _jac_autograd_batched(f, x: torch.Tensor, jac: torch.Tensor, chunk: int) -> None:
    """Reverse mode with ``torch.autograd.grad(..., is_grads_batched=True)`` on one graph."""
    batch, n = jac.shape[0], jac.shape[1]
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = f(xg)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            cot = _basis(start, stop, batch, x.shape[1:], out.dtype, x.device)
            (rows,) = torch.autograd.grad(out, xg, cot, retain_graph=stop < n, is_grads_batched=True)
            jac[:, start:stop, :] = rows.reshape(stop - start, batch, n).transpose(0, 1)


def _jac_replicated(net, x, sigma, class_labels, dtype, jac: torch.Tensor, chunk: int) -> None:
    """Reverse mode without any vmap: the batch is replicated ``chunk`` times, one backward per chunk."""
    batch, n = jac.shape[0], jac.shape[1]
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        c = stop - start
        with torch.enable_grad():
            xg = x.detach().unsqueeze(0).expand(c, *x.shape).reshape(c * batch, *x.shape[1:])
            xg = xg.clone().requires_grad_(True)
            labels = (
                None if class_labels is None else class_labels.repeat(c, *([1] * (class_labels.ndim - 1)))
            )
            out = net(xg, sigma.repeat(c), labels).to(dtype)
            cot = _basis(start, stop, batch, x.shape[1:], dtype, x.device).reshape(c * batch, *x.shape[1:])
            (rows,) = torch.autograd.grad(out, xg, cot)
        jac[:, start:stop, :] = rows.reshape(c, batch, n).transpose(0, 1)


# ----------------------------------------------------------------------------
# Public API.


def denoiser_jacobian(
    net: Callable,
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    class_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    method: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Full Jacobian of ``net(x, sigma)`` w.r.t. ``x`` at each of B points: (B, n, n) in ``dtype``.

    ``J[b, i, j] = d D(x_b; sigma_b)_i / d x_b[j]`` with pixels flattened in C order.

    Args:
        net:          Denoiser ``net(x, sigma, class_labels) -> D(x)``; modules run in eval mode.
        x:            Points, (B, C, H, W) (or any (B, ...)); cast to ``dtype``.
        sigma:        Noise level, a scalar or one per point ((B,) or (B,1,1,1)), > 0.
        class_labels: Optional (B, label_dim) labels passed through to ``net``.
        chunk_size:   Basis vectors (rows or columns of J) per vectorised pass; bounds memory at
                      about ``chunk_size * B`` concurrent backward (forward) passes. Default:
                      ``clip(65536 // n, 16, 4096) // B`` on CPU, ``clip(2**20 // n, 16, 4096) // B``
                      on accelerators (at least 1, at most n).
        method:       ``'vjp'`` (reverse mode: one forward, vmap'ed VJPs), ``'jvp'`` (forward mode:
                      vmap'ed JVPs) or ``'auto'`` (= ``'vjp'``, faster for conv nets on CPU).
        dtype:        Dtype of the computation and of the result. float32 (default) suits networks,
                      which compute in float32 anyway; use float64 for closed-form denoisers.

    Attention runs with the math SDPA backend (vmap-compatible). If ``torch.func`` cannot transform
    the network (e.g. a custom ``autograd.Function`` without vmap support, or an op without a
    forward-mode rule under vmap for ``'jvp'``), it falls back, with a RuntimeWarning, to the next of:
    torch.func VJPs, batched autograd (``is_grads_batched=True``), and a batch replicated
    ``chunk_size`` times with one backward per chunk. Never a loop over the n outputs.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    x = torch.as_tensor(x)
    if x.ndim < 2:
        raise ValueError(f"x must be batched, shape (B, C, H, W); got shape {tuple(x.shape)}")
    batch = x.shape[0]
    n = math.prod(x.shape[1:])
    if chunk_size is None:
        chunk_size = _default_chunk_size(n, batch, x.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = min(int(chunk_size), n)
    x = x.detach().to(dtype)
    sigma_b = _sigma_vector(sigma, batch, x.device, dtype)
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, device=x.device)
        if class_labels.shape[0] != batch:
            raise ValueError(
                f"class_labels must have {batch} rows (one per point), got shape {tuple(class_labels.shape)}"
            )

    def f(inp: torch.Tensor) -> torch.Tensor:
        return net(inp, sigma_b, class_labels).to(dtype)

    engines = [("torch.func vjp", lambda: _jac_func_vjp(f, x, jac, chunk))]
    if method == "jvp":
        engines.insert(0, ("torch.func jvp", lambda: _jac_func_jvp(f, x, jac, chunk)))
    engines += [
        ("batched autograd", lambda: _jac_autograd_batched(f, x, jac, chunk)),
        ("replicated batch", lambda: _jac_replicated(net, x, sigma_b, class_labels, dtype, jac, chunk)),
    ]
    jac = torch.empty(batch, n, n, dtype=dtype, device=x.device)
    # The math SDPA backend decomposes attention into ops with vmap rules (the fused CPU kernel's
    # backward has none); dropout is off in eval mode.
    with _eval_mode(net), torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        out_shape = f(x).shape
        if out_shape != x.shape:
            raise ValueError(f"net output shape {tuple(out_shape)} differs from input shape {tuple(x.shape)}")
        _first_engine_that_works(engines, type(net).__name__)
    return jac


def _first_engine_that_works(engines: list[tuple[str, Callable[[], None]]], what: str) -> None:
    """Run the engines in turn until one does not fail with a transform error; warn about the failed
    ones when a later one works, and raise a RuntimeError naming them all when none does."""
    failures: list[str] = []
    for i, (name, engine) in enumerate(engines):
        try:
            engine()
        except _TRANSFORM_ERRORS as err:
            failures.append(f"{name}: {type(err).__name__}: {str(err)[:200]}")
            if i == len(engines) - 1:
                raise RuntimeError(f"no Jacobian engine worked for {what}: " + "; ".join(failures)) from err
            continue
        if failures:
            warnings.warn(
                f"Jacobian of {what} computed with {name} after: " + "; ".join(failures),
                RuntimeWarning,
                stacklevel=3,
            )
        return


def effective_rank(
    singular_values: torch.Tensor | np.ndarray | Sequence[float],
    ratio: float = 0.99,
    rule: str = "authors",
) -> int | torch.Tensor:
    """Smallest r whose top-r singular values hold ``ratio`` of the spectrum; batched over leading dims.

    Rules (s sorted descending, the last dim of ``singular_values``):

    - ``'authors'`` (their code): ``sqrt(sum_{i<=r} s_i^2) > ratio * sqrt(sum_i s_i^2)``, i.e. the top-r
      part holds a fraction ``ratio^2`` of the energy: with 0.99 that is the energy rule at 0.9801.
    - ``'energy'``: ``sum_{i<=r} s_i^2 > ratio * sum_i s_i^2`` (fraction ``ratio`` of the squared
      Frobenius norm), the other common reading; it gives a rank >= the authors' at the same ratio.

    Returns a Python int for a 1-D input, else a long tensor of the leading shape. An all-zero
    spectrum has rank 0.
    """
    if rule not in RANK_RULES:
        raise ValueError(f"rule must be one of {RANK_RULES}, got {rule!r}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    s = torch.as_tensor(singular_values).detach().to(torch.float64)
    if s.ndim == 0 or s.shape[-1] == 0:
        raise ValueError(f"singular_values must have a non-empty last dimension, got shape {tuple(s.shape)}")
    if bool(torch.any(s < 0)) or not bool(torch.all(torch.isfinite(s))):
        raise ValueError("singular_values must be finite and non-negative")
    energy = torch.cumsum(torch.sort(s, dim=-1, descending=True).values ** 2, dim=-1)
    if rule == "authors":
        acc = energy.sqrt()
        threshold = ratio * acc[..., -1:]
    else:
        acc = energy
        threshold = ratio * energy[..., -1:]
    # acc is non-decreasing, so the first index with acc > threshold is the count of acc <= threshold.
    rank = (acc <= threshold).sum(dim=-1) + 1
    rank = rank.clamp(max=s.shape[-1])
    rank = torch.where(energy[..., -1] > 0, rank, torch.zeros_like(rank))
    return int(rank) if s.ndim == 1 else rank


def jacobian_singular_values(
    net: Callable,
    x: torch.Tensor,
    sigma: float | torch.Tensor,
    class_labels: torch.Tensor | None = None,
    chunk_size: int | None = None,
    method: str = "auto",
    dtype: torch.dtype = torch.float32,
    svd_dtype: torch.dtype | None = torch.float64,
) -> torch.Tensor:
    """Singular values of the denoiser Jacobian at each point, descending: (B, n).

    The Jacobian is computed in ``dtype`` (see :func:`denoiser_jacobian`); the batched SVD
    (``torch.linalg.svdvals``) runs in ``svd_dtype`` (float64 as the authors; None: ``dtype``, faster).
    """
    jac = denoiser_jacobian(net, x, sigma, class_labels, chunk_size=chunk_size, method=method, dtype=dtype)
    return torch.linalg.svdvals(jac if svd_dtype is None else jac.to(svd_dtype))


# ----------------------------------------------------------------------------
# Rank profiles: point generators say where the Jacobian is taken, as (step, sigma, x) with x a batch
# of points (B, C, H, W) at noise level sigma; a RankTable turns each into rows of ranks.


def sigma_grid_points(
    sigmas: Sequence[float] | torch.Tensor | None = None,
    points: torch.Tensor | None = None,
    clean: torch.Tensor | None = None,
    noise: Callable[[torch.Size], torch.Tensor] | None = None,
) -> Iterator[tuple[int, float, torch.Tensor]]:
    """(step, sigma, x) for each sigma of the grid (default ``1 / AUTHORS_SNR_GRID``): the noisy
    ``points`` as they are, or, from clean images x0 = ``clean``, ``x0 + sigma * eps`` (float64) with
    one ``eps = noise(x0.shape)`` for all sigmas. Exactly one of ``points`` and ``clean``."""
    if sigmas is None:
        sigmas = [1.0 / snr for snr in AUTHORS_SNR_GRID]
    sigma_list = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)]
    if not sigma_list or min(sigma_list) <= 0:
        raise ValueError(f"sigmas must be a non-empty list of positive noise levels, got {sigmas!r}")
    if (points is None) == (clean is None):
        raise ValueError("the sigma-grid mode needs exactly one of points= (noisy) or clean= (x0)")
    if clean is None:
        points = torch.as_tensor(points)
        return ((i, s, points) for i, s in enumerate(sigma_list))
    x0 = torch.as_tensor(clean).to(torch.float64)
    if noise is None:
        raise ValueError("clean= needs a generator= or seeds= for the noise")
    eps = noise(x0.shape).to(device=x0.device, dtype=torch.float64)
    return ((i, s, x0 + s * eps) for i, s in enumerate(sigma_list))


def trajectory_points(
    net: Callable,
    latents: torch.Tensor,
    visit: Callable[[int, float, torch.Tensor], None],
    class_labels: torch.Tensor | None = None,
    **sampler: Any,
) -> torch.Tensor:
    """Run ``sampling.edm_sampler`` from ``latents`` (``sampler``: its options, e.g. ``num_steps``,
    ``S_churn``, ``noise``) and call ``visit(step, sigma, x)`` at each step's starting point, with
    its level (``t_i``, or ``t_hat`` under churn): the authors' points. Returns the final samples.

    Nothing of the path is kept: each point is visited while the sampler is at it. The net runs in
    eval mode without gradients."""

    def callback(step: dict) -> None:
        if step["sigma_hat"] > 0:
            visit(step["i"], step["sigma_hat"], step["x"])

    if class_labels is not None:
        sampler["class_labels"] = class_labels
    with _eval_mode(net), torch.no_grad():
        return edm_sampler(net, latents, callback=callback, **sampler)


class RankTable:
    """Effective ranks of the denoiser Jacobian at batches of points, collected as table rows.

    ``add(step, sigma, x)`` (a point generator's visit) computes the singular values at the points
    ``x`` (B, ...) in batches of ``batch_size`` and adds one row per point and rule; ``frame()``
    returns the table (columns: see :func:`rank_profile`). ``seeds`` (one per point) label the rows.
    """

    COLUMNS = ("point", "seed", "step", "sigma", "snr", "rank", "rank_ratio", "n", "rule", "ratio")

    def __init__(
        self,
        net: Callable,
        ratio: float = 0.99,
        rule: str | Sequence[str] = "authors",
        seeds: Sequence[int] | None = None,
        class_labels: torch.Tensor | None = None,
        batch_size: int | None = None,
        **jacobian: Any,  # chunk_size, method, dtype, svd_dtype of jacobian_singular_values
    ):
        self.rules = [rule] if isinstance(rule, str) else list(rule)
        for r in self.rules:
            if r not in RANK_RULES:
                raise ValueError(f"rule must be one of {RANK_RULES}, got {r!r}")
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if batch_size is not None and int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.net, self.ratio, self.class_labels, self.jacobian = net, float(ratio), class_labels, jacobian
        self.seeds = None if seeds is None else [int(s) for s in seeds]
        self.batch_size = None if batch_size is None else int(batch_size)
        self.rows: list[dict] = []

    def add(self, step: int, sigma: float, x: torch.Tensor) -> None:
        """Rows for the points ``x`` (B, ...) at noise level ``sigma``, labelled ``step``."""
        num_points, n = x.shape[0], math.prod(x.shape[1:])
        if self.seeds is not None and len(self.seeds) != num_points:
            raise ValueError(f"{len(self.seeds)} seeds for {num_points} points")
        bs = self.batch_size or num_points
        for lo in range(0, num_points, bs):
            hi = min(num_points, lo + bs)
            labels = None if self.class_labels is None else self.class_labels[lo:hi]
            sv = jacobian_singular_values(self.net, x[lo:hi], sigma, labels, **self.jacobian)
            for r in self.rules:
                for j, rank in enumerate(effective_rank(sv, ratio=self.ratio, rule=r).tolist()):
                    seed = self.seeds[lo + j] if self.seeds is not None else None
                    row = dict(point=lo + j, seed=seed, step=step, sigma=sigma, snr=1.0 / sigma)
                    row.update(rank=int(rank), rank_ratio=rank / n, n=n, rule=r, ratio=self.ratio)
                    self.rows.append(row)

    def frame(self) -> pd.DataFrame:
        """The rows as a DataFrame sorted by step, point and rule; ``seed`` is nullable Int64."""
        import pandas as pd  # pandas is slow to import and only the tables need it

        df = pd.DataFrame(self.rows, columns=list(self.COLUMNS))
        df["seed"] = df["seed"].astype("Int64")
        return df.sort_values(["step", "point", "rule"], kind="stable", ignore_index=True)


def _seed_latents(net: Callable, seeds: Sequence[int], shape, dtype: torch.dtype, device: torch.device):
    """(noise, draws): the seeds' generators (``sampling.SeedNoise``) and their first standard-normal
    draw of ``shape`` (default the net's (C, H, W)), as ``sampling.generate`` draws latents."""
    if shape is None:
        try:
            shape = (net.img_channels, net.img_resolution, net.img_resolution)
        except AttributeError:
            raise ValueError(
                "latents from seeds need img_shape=(C, H, W) or a net with img_channels/img_resolution"
            ) from None
    noise = SeedNoise(seeds, device=device)
    return noise, noise.randn([int(d) for d in shape], dtype=dtype)


def _grid_noise(net: Callable, seeds: list[int] | None, generator: torch.Generator | None, device):
    """``noise(shape)`` for :func:`sigma_grid_points`: one draw per seed (as ``sampling.generate``
    draws latents), else from ``generator``; None without either."""
    if seeds is not None:

        def from_seeds(shape: torch.Size) -> torch.Tensor:
            if len(seeds) != shape[0]:
                raise ValueError(f"{len(seeds)} seeds for {shape[0]} clean points")
            return _seed_latents(net, seeds, shape[1:], torch.float64, device)[1]

        return from_seeds
    if generator is not None:
        return lambda shape: torch.randn(
            shape, generator=generator, device=generator.device, dtype=torch.float64
        )
    return None


def rank_profile(
    net: Callable,
    points: torch.Tensor | None = None,             # Noisy points (grid) or latents (trajectory).
    sigmas: Sequence[float] | torch.Tensor | None = None,  # The grid; default 1 / AUTHORS_SNR_GRID.
    *,
    trajectory: bool = False,                       # Along sampling trajectories instead of a grid.
    clean: torch.Tensor | None = None,              # Grid around clean images x0 (B, C, H, W).
    generator: torch.Generator | None = None,       # Noise of the points around clean images ...
    seeds: Sequence[int] | None = None,             # ... or one generator per seed (also the latents).
    num_steps: int = 18,                            # Sampler options of the trajectory (edm_sampler).
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    order: int = 2,
    S_churn: float = 0.0,                           # Churn; its noise comes from the seeds' generators.
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    class_labels: torch.Tensor | None = None,       # (B, label_dim) labels passed to the net.
    ratio: float = 0.99,                            # Rank rule and ratio (effective_rank); rule may
    rule: str | Sequence[str] = "authors",          # be a list, e.g. ['authors', 'energy'].
    chunk_size: int | None = None,                  # Jacobian options (denoiser_jacobian).
    method: str = "auto",
    dtype: torch.dtype = torch.float32,
    svd_dtype: torch.dtype | None = torch.float64,  # SVD dtype (jacobian_singular_values).
    batch_size: int | None = None,                  # Points per Jacobian call (memory B n^2); default all.
    img_shape: Sequence[int] | None = None,         # (C, H, W) of latents from seeds; default the net's.
    device: str | torch.device | None = None,       # Device of latents from seeds; default the net's.
) -> pd.DataFrame:  # fmt: skip
    """Effective rank of the denoiser Jacobian vs noise level, as a tidy ``pandas.DataFrame``.

    - ``trajectory=True``: ``edm_sampler`` runs from the latents ``points`` (or from ``seeds``, with
      the churn noise from the seeds' generators as in ``sampling.generate``) and the Jacobian is
      taken at each noisy point where step i starts, with its sigma (``t_i``, or ``t_hat`` under
      churn): the authors' procedure (module docstring, :func:`trajectory_points`).
    - sigma grid (default): for each sigma, at the noisy ``points`` as they are, or at
      ``x0 + sigma * eps`` around ``clean=`` images with one eps per point shared by all sigmas
      (:func:`sigma_grid_points`).

    Columns (:class:`RankTable`): ``point`` (index), ``seed`` (or <NA>), ``step`` (index into the
    sigmas), ``sigma``, ``snr`` (= 1/sigma), ``rank``, ``rank_ratio`` (= rank/n), ``n``, ``rule``,
    ``ratio``; one row per point, sigma and rule.
    """
    jac = dict(chunk_size=chunk_size, method=method, dtype=dtype, svd_dtype=svd_dtype)
    table = RankTable(net, ratio, rule, seeds, class_labels, batch_size, **jac)
    seeds = table.seeds
    dev = torch.device(device) if device is not None else _module_device(net) or torch.device("cpu")

    if not trajectory:  # on a sigma grid
        noise = _grid_noise(net, seeds, generator, dev)
        for step, sigma, x in sigma_grid_points(sigmas, points, clean, noise):
            table.add(step, sigma, x)
        return table.frame()

    # Along sampling trajectories; seeds give float32 latents drawn as sampling.generate draws them.
    if sigmas is not None:
        raise ValueError("sigmas must be None with trajectory=True: the sampler's schedule sets them")
    if clean is not None:
        raise ValueError("clean= is for the sigma-grid mode, not trajectory=True")
    if points is None and seeds is None:
        raise ValueError("trajectory=True needs latents (points=) or seeds=")
    noise = None  # the seeds' generators, continued by the churn after the latents are drawn
    if points is None:
        noise, points = _seed_latents(net, seeds, img_shape, torch.float32, dev)
    if S_churn > 0 and noise is None:
        raise ValueError("S_churn > 0 needs seeds= (the churn noise comes from the seeds' generators)")
    if seeds is not None and len(seeds) != points.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for {points.shape[0]} points")
    sampler = dict(num_steps=num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, order=order)
    churn = dict(S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, noise=noise)
    trajectory_points(net, points, table.add, class_labels, **sampler, **churn)
    return table.frame()
