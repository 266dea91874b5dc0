"""The empirical optimal denoiser: the posterior mean of the training set seen as a distribution.

D*(x; sigma) = sum_i y_i w_i(x),  w = softmax_i(-||x - y_i||^2 / (2 sigma^2)),  y_i the training
images in model space [-1, 1]. It is computed in one pass over the training set, chunk by chunk,
with an online log-sum-exp (running maximum, rescaled denominator and numerator, float64
accumulators), so memory stays O(batch x D + chunk x D) whatever the training-set size.

The logits use -||x - y||^2 = 2 x.y - ||y||^2 - ||x||^2; the last term is constant over i and cancels
in the softmax, so one matrix product per chunk gives them, with ||y||^2 precomputed in float64. A
second product per chunk gives the numerator sum_i w_i y_i; points whose weights underflow to 0 for
the whole batch (most of them at small sigma) are skipped. Data and queries are shifted by a fixed
centre (the data mean, or the first streamed chunk's mean): distances do not change, and the dot
products lose less precision to rounding. Cost: about two (B x D) @ (D x N) products per call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from .data import flat_rows, to_model
from .devices import default_device

__all__ = ["OptimalDenoiser", "PosteriorStats"]


class PosteriorStats(NamedTuple):
    """Diagnostics of the posterior weights w_i(x), one value per query (shapes (B,))."""

    denoised: torch.Tensor  # (B, C, H, W): the posterior mean D*(x; sigma)
    max_weight: torch.Tensor  # (B,) float64: max_i w_i, 1 when one training point takes all the mass
    entropy: torch.Tensor  # (B,) float64: -sum_i w_i ln w_i in nats, 0 for one point, ln N for uniform
    nearest: torch.Tensor  # (B,) int64: index of the nearest training point (the largest weight)


def _as_model_space(batch: Any, device: torch.device, dtype: torch.dtype, copy: bool) -> torch.Tensor:
    """One batch of training data as a float tensor in model space; uint8 is mapped by ``data.to_model``."""
    if (
        isinstance(batch, (tuple, list))
        and len(batch) > 0
        and isinstance(batch[0], (torch.Tensor, np.ndarray))
    ):
        batch = batch[0]  # (images, labels) as a DataLoader over an EDM dataset yields
    if isinstance(batch, np.ndarray):
        batch = torch.from_numpy(np.ascontiguousarray(batch))
    if not isinstance(batch, torch.Tensor):
        raise ValueError(f"training data must be tensors or arrays, got {type(batch).__name__}")
    if batch.dtype == torch.uint8:
        return to_model(batch, device, dtype)
    if not batch.is_floating_point():
        raise ValueError(f"training data must be uint8 or floating point, got {batch.dtype}")
    return batch.to(device=device, dtype=dtype, copy=copy)


def _training_rows(t: torch.Tensor, img_shape: tuple[int, ...] | None, what: str) -> torch.Tensor:
    """(N, C, H, W) or, with ``img_shape``, (N, D) data as non-empty rows (N, D) (``data.flat_rows``)."""
    if img_shape is None and t.ndim != 4:
        raise ValueError(f"{what} has shape {tuple(t.shape)}: expected (N, C, H, W), or pass img_shape")
    t = flat_rows(t, what, img_shape)
    if t.shape[0] == 0:
        raise ValueError(f"{what} is empty (shape {tuple(t.shape)})")
    return t


class OptimalDenoiser(torch.nn.Module):
    """Posterior mean of the empirical training distribution, callable like an EDM network.

    ``train`` is either in memory, a float tensor (N, C, H, W) in model space or a uint8
    tensor/array (converted by ``data.to_model``), or streamed: a re-iterable of batches (a list, a
    DataLoader) or a callable returning a fresh iterator of batches on each call, e.g.
    ``lambda: iter_image_batches(path, 1024)``; batches may be uint8 or float, or (images, labels)
    tuples. The denoiser reads the whole source on every call. ``dtype`` is the precision of the
    two matrix products per chunk and of the weights' exponentials (float32: fast, outputs within
    ~1e-6; float64: exact to rounding); logits, running maxima and accumulators are always float64.
    The denoiser is differentiable with respect to x (for Jacobians).
    """

    def __init__(
        self,
        train: torch.Tensor | np.ndarray | Iterable | Callable[[], Iterator],  # training set or batches
        chunk_size: int = 1024,                                # training points per matrix product
        device: str | torch.device | None = None,              # where the work happens (default: CUDA if any)
        img_shape: tuple[int, int, int] | None = None,         # (C, H, W); needed for flattened (N, D) data
        dtype: torch.dtype = torch.float32,                    # precision of the products and exponentials
    ):  # fmt: skip
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        device = default_device(device)
        self.chunk_size = int(chunk_size)
        self.compute_dtype = dtype
        self.sigma_min = 0.0
        self.sigma_max = float("inf")
        self.label_dim = 0
        self._factory: Callable[[], Iterator] | None = None

        if isinstance(train, (torch.Tensor, np.ndarray)):
            data = _as_model_space(train, device, dtype, copy=True)
            shape = tuple(img_shape) if img_shape is not None else tuple(data.shape[1:])
            data = _training_rows(data, shape if img_shape is not None else None, "train")
            center = data.mean(0, dtype=torch.float64)
            data.sub_(center.to(dtype))
            half_sq = torch.cat([0.5 * y.double().square().sum(1) for y in data.split(self.chunk_size)])
            self.register_buffer("_train", data, persistent=False)
            self.register_buffer("_half_sq", half_sq, persistent=False)
            self.num_train: int | None = data.shape[0]
        else:
            self._factory = self._make_factory(train)
            try:
                first = next(iter(self._factory()))
            except StopIteration:
                raise ValueError("the training-data source produced no batches") from None
            t = _as_model_space(first, device, torch.float64, copy=False)
            shape = tuple(img_shape) if img_shape is not None else tuple(t.shape[1:])
            t = _training_rows(t, shape if img_shape is not None else None, "the first training batch")
            center = t.mean(0)
            self.num_train = None  # known after the first full pass
        if len(shape) != 3:
            raise ValueError(f"img_shape must be (C, H, W), got {shape}")
        self.img_shape = shape
        self.img_channels, self.img_resolution = int(shape[0]), int(shape[1])
        self.register_buffer("_center", center.to(dtype), persistent=False)
        self.register_buffer("_center64", center.double(), persistent=False)

    @staticmethod
    def _make_factory(train: Any) -> Callable[[], Iterator]:
        if callable(train):
            return train
        if isinstance(train, Iterable):
            if iter(train) is train:
                raise ValueError(
                    "train is a one-shot iterator (e.g. a generator) but the denoiser reads the training set "
                    "on every call: pass a callable returning a fresh iterator, e.g. "
                    "lambda: iter_image_batches(path, batch_size)"
                )
            return lambda: iter(train)
        raise ValueError(
            "train must be a tensor, an array, a re-iterable of "
            f"batches or a callable, got {type(train).__name__}"
        )

    @property
    def device(self) -> torch.device:
        return self._center.device

    @property
    def streaming(self) -> bool:
        """True when the training set is read from a source on every call rather than held in memory."""
        return self._factory is not None

    def extra_repr(self) -> str:
        n = "streamed" if self.streaming else str(self.num_train)
        return f"N={n}, img_shape={self.img_shape}, chunk_size={self.chunk_size}, dtype={self.compute_dtype}"

    def round_sigma(self, sigma: float | torch.Tensor) -> torch.Tensor:
        """Any sigma is allowed: returned unchanged as a tensor."""
        return torch.as_tensor(sigma)

    # ------------------------------------------------------------------------------------------

    def _chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (centred training chunk (n, D), half squared norms (n,) float64)."""
        if self._factory is None:
            for start in range(0, self._train.shape[0], self.chunk_size):
                stop = start + self.chunk_size
                yield self._train[start:stop], self._half_sq[start:stop]
            return
        count = 0
        for batch in self._factory():
            t = _as_model_space(batch, self.device, self.compute_dtype, copy=False)
            if t.ndim > 0 and t.shape[0] == 0:
                continue
            t = _training_rows(t, self.img_shape, "a training batch")
            for piece in t.split(self.chunk_size):
                y = piece - self._center
                count += y.shape[0]
                yield y, 0.5 * y.double().square().sum(1)
        if count == 0:
            raise ValueError("the training-data source produced no data on this pass")
        self.num_train = count

    def _sigma_sq(self, sigma: float | torch.Tensor, batch: int) -> torch.Tensor:
        """sigma as a python float, 0-d, (B,) or (B, 1, 1, 1) tensor -> sigma^2 as (B, 1) float64."""
        s = torch.as_tensor(sigma, dtype=torch.float64, device=self.device)
        if s.numel() == 1:
            s = s.reshape(1, 1).expand(batch, 1)
        elif s.numel() == batch:
            s = s.reshape(batch, 1)
        else:
            raise ValueError(
                f"sigma has shape {tuple(s.shape)}, expected a scalar, ({batch},) or ({batch}, 1, 1, 1)"
            )
        return s.square()

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 1 or math.prod(x.shape[1:]) != math.prod(self.img_shape):
            raise ValueError(
                f"x has shape {tuple(x.shape)}, expected (B, {', '.join(map(str, self.img_shape))})"
            )
        return x.reshape(x.shape[0], -1).to(device=self.device, dtype=self.compute_dtype) - self._center

    def _pass(
        self, xc: torch.Tensor, s2: torch.Tensor | None, numerator: bool = True, entropy: bool = False
    ) -> dict[str, torch.Tensor]:
        """One pass over the training set for centred queries xc (B, D) and sigma^2 (B, 1).

        With shift m = running max of g_i = x.y_i - ||y_i||^2/2 (so the logits are g_i / sigma^2),
        accumulates S = sum_i e_i and N = sum_i e_i y_i with e_i = exp((g_i - m) / sigma^2), and
        optionally T = sum_i e_i (g_i - m) / sigma^2 for the entropy. ``s2=None`` only tracks the argmax.
        """
        zero = bool((s2 == 0).any()) if s2 is not None else False

        def scaled_exp(d: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
            """exp(d / sigma^2) for d <= 0 (0/0 counts as 0), exponentiated in ``dtype``."""
            z = d / s2
            return torch.exp((torch.where(d == 0, 0.0, z) if zero else z).to(dtype))

        inplace = not (torch.is_grad_enabled() and xc.requires_grad)
        gmax = argmax = den = num = tsum = None
        offset = 0
        for y, half_sq in self._chunks():
            g = (xc @ y.T).double() - half_sq  # (B, n)
            cmax, carg = g.detach().max(1, keepdim=True)
            carg = carg + offset
            offset += y.shape[0]
            if gmax is None:
                new, argmax = cmax, carg
            else:
                argmax = torch.where(cmax > gmax, carg, argmax)
                new = torch.maximum(gmax, cmax)
            if s2 is not None:
                e = scaled_exp(g - new, y.dtype)  # in [0, 1]: float32 keeps 7 digits
                part_den = e.sum(1, keepdim=True, dtype=torch.float64)
                part_num = self._weighted_sum(e, y) if numerator else None
                if entropy:
                    z = torch.where(g == new, 0.0, (g - new) / s2)
                    part_t = torch.where(e > 0, e * z, 0.0).sum(1, keepdim=True)
                if den is None:
                    den, num = part_den, part_num
                    if entropy:
                        tsum = part_t
                else:
                    scale = scaled_exp(gmax - new)  # (B, 1), <= 1
                    if entropy:  # T' = scale * (T + S * (m_old - m_new) / sigma^2)
                        dm = torch.where(gmax == new, 0.0, (gmax - new) / s2)
                        tsum = torch.where(scale > 0, scale * (tsum + den * dm), 0.0) + part_t
                    if inplace:
                        den.mul_(scale).add_(part_den)
                        if numerator:
                            num.mul_(scale).add_(part_num)
                    else:
                        den = den * scale + part_den
                        if numerator:
                            num = num * scale + part_num
            gmax = new
        out = {"argmax": argmax.squeeze(1)}
        if s2 is not None:
            out["den"] = den
            if numerator:
                out["num"] = num
            if entropy:
                out["tsum"] = tsum
        return out

    @staticmethod
    def _weighted_sum(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """sum_i w_i y_i as (B, D) float64 from weights w (B, n) and a chunk y (n, D), same dtype.

        Training points whose weight underflows to zero for every query (most of them at small
        sigma) are left out of the product; the result is the same as with them.
        """
        if bool(w.min() > 0):
            return (w @ y).double()
        live = w.amax(0) > 0
        if int(live.sum()) > y.shape[0] // 2:
            return (w @ y).double()
        idx = live.nonzero().squeeze(1)
        return (w[:, idx] @ y[idx]).double()

    # ------------------------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        sigma: float | torch.Tensor,
        class_labels: torch.Tensor | None = None,
        **model_kwargs,
    ) -> torch.Tensor:
        """D*(x; sigma) for x (B, C, H, W); returned in x's floating dtype (float32 for other inputs)."""
        s2 = self._sigma_sq(sigma, x.shape[0])
        acc = self._pass(self._queries(x), s2)
        out = acc["num"] / acc["den"] + self._center64
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return out.reshape(x.shape).to(device=x.device, dtype=dtype)

    def posterior_stats(self, x: torch.Tensor, sigma: float | torch.Tensor) -> PosteriorStats:
        """The posterior mean together with the weights' max, entropy (nats) and argmax, in one pass."""
        s2 = self._sigma_sq(sigma, x.shape[0])
        acc = self._pass(self._queries(x), s2, entropy=True)
        den = acc["den"].squeeze(1)
        denoised = (acc["num"] / acc["den"] + self._center64).reshape(x.shape)
        ent = torch.log(den) - acc["tsum"].squeeze(1) / den
        dtype = x.dtype if x.is_floating_point() else torch.float32
        return PosteriorStats(
            denoised.to(x.device, dtype),
            (1.0 / den).to(x.device),
            ent.to(x.device),
            acc["argmax"].to(x.device),
        )

    @torch.no_grad()
    def nearest_train_index(self, x: torch.Tensor) -> torch.Tensor:
        """Index (B,) int64 of the training point nearest to each x in L2 (the sigma -> 0 limit's choice)."""
        return self._pass(self._queries(x), None, numerator=False)["argmax"].to(x.device)
