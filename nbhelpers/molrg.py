"""Mixture of low-rank Gaussians (MoLRG, P2): data, closed-form and low-rank denoisers, subspace distance.

The data live in R^n, n = C*R*R, and are stored as images (N, C, R, R) flattened in C order. Class
k (uniform over K) draws x0 = U_k a with a ~ N(0, I_d); the bases U_k (n, d) are consecutive column
blocks of one random orthogonal matrix, so they are orthonormal and mutually orthogonal.

For x = x0 + sigma * eps, class k makes x ~ N(0, U_k U_k^T + sigma^2 I), whose inverse covariance is
I / sigma^2 - U_k U_k^T / (sigma^2 (1 + sigma^2)). With equal priors and equal d the log-determinants
cancel, so the class posterior is softmax_k(||U_k^T x||^2 / (2 sigma^2 (1 + sigma^2))), and within
class k, E[x0 | x] = U_k U_k^T x / (1 + sigma^2). The posterior mean is the weighted sum of these.
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_path


def _generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(0 if generator is None else int(generator))


def _compute_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _qr_bases(U: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Learned bases (..., K, n, d) orthonormalised by QR (differentiably), in ``dtype``."""
    return torch.linalg.qr(U.to(dtype)).Q


def _sigma_column(sigma, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """sigma as a python float, 0-d, (N,) or (N,1,1,1) tensor -> (N, 1) tensor."""
    s = torch.as_tensor(sigma, dtype=dtype, device=device).reshape(-1)
    if s.numel() == 1:
        s = s.expand(batch)
    if s.numel() != batch:
        raise ValueError(f"sigma holds {s.numel()} values for a batch of {batch}")
    return s.reshape(batch, 1)


def posterior_mean(x: torch.Tensor, bases: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x0 | x] for the MoLRG with orthonormal ``bases`` (..., K, n, d): x (..., N, n), sigma (N, 1) ->
    (..., N, n); leading axes index independent mixtures (a stack of models).

    Computed in the dtype of ``x``; the class weights use a max-shifted softmax (log-sum-exp).
    sigma = 0 projects onto the best-fitting subspace; sigma = inf gives 0.
    """
    k, n, d = bases.shape[-3:]
    side = bases.movedim(-3, -2).reshape(*bases.shape[:-3], n, k * d)  # [U_1 ... U_K], (..., n, K d)
    coef = (x @ side).unflatten(-1, (k, d))  # U_k^T x, (..., N, K, d)
    energy = coef.square().sum(-1)  # ||U_k^T x||^2, (..., N, K)
    s2 = sigma.square()
    positive = s2 > 0
    scale = 1 / (2 * torch.where(positive, s2, torch.ones_like(s2)) * (1 + s2))
    weights = torch.softmax(energy * scale, dim=-1)
    if not bool(positive.all()):
        hard = torch.nn.functional.one_hot(energy.argmax(dim=-1), k).to(weights.dtype)
        weights = torch.where(positive, weights, hard)
    # sum_k w_k U_k U_k^T x: weight each class's coefficients, then one product with [U_1 ... U_K]^T
    return ((coef * weights.unsqueeze(-1)).flatten(-2) @ side.transpose(-1, -2)) / (1 + s2)


class _SubspaceDenoiser(torch.nn.Module):
    """Shared denoiser interface: shapes, sigma range, and the posterior-mean forward pass.

    Subclasses provide ``_bases_for(dtype)``: the orthonormal bases (K, n, d) to use.
    """

    label_dim = 0
    sigma_min = 0.0
    sigma_max = math.inf

    def __init__(self, img_resolution: int, img_channels: int):
        super().__init__()
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)

    def round_sigma(self, sigma) -> torch.Tensor:
        """Identity: any noise level is representable (python numbers become float64 tensors)."""
        return sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma, dtype=torch.float64)

    def forward(
        self,
        x: torch.Tensor,                             # Noisy images (N, C, R, R), float32 or float64.
        sigma: torch.Tensor | float,                 # Noise level: scalar, (N,) or (N, 1, 1, 1).
        class_labels: torch.Tensor | None = None,    # Ignored: the model is unconditional (label_dim 0).
        augment_labels: torch.Tensor | None = None,  # Not supported; must be None.
    ) -> torch.Tensor:  # fmt: skip
        """Posterior-mean estimate of the clean images, same shape and dtype as ``x``."""
        if augment_labels is not None:
            raise ValueError(f"{type(self).__name__} does not support augmentation labels")
        shape = (self.img_channels, self.img_resolution, self.img_resolution)
        if x.ndim != 4 or tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"expected x of shape (N, {shape[0]}, {shape[1]}, {shape[2]}), got {tuple(x.shape)}"
            )
        dtype = _compute_dtype(x.device)
        bases = self._bases_for(dtype)  # (K, n, d), or (M, K, n, d) for a stack of M models
        lead = bases.shape[:-3]
        flat = x.reshape(x.shape[0], *lead, -1).to(dtype).movedim(0, -2)  # (N, n) or (M, N, n)
        s = _sigma_column(sigma, x.shape[0], x.device, dtype)
        out = posterior_mean(flat, bases, s).movedim(-2, 0)
        return out.reshape(x.shape).to(x.dtype)


class MoLRGDenoiser(_SubspaceDenoiser):
    """Exact posterior-mean denoiser of a MoLRG with orthonormal ``bases`` (K, n, d), ``shape`` (C, R, R)."""

    def __init__(self, bases: torch.Tensor, shape: tuple[int, int, int]):
        c, r, r2 = (int(v) for v in shape)
        if r != r2 or bases.ndim != 3 or bases.shape[1] != c * r * r:
            raise ValueError(f"bases {tuple(bases.shape)} do not fit images of shape {tuple(shape)}")
        super().__init__(img_resolution=r, img_channels=c)
        self.register_buffer("bases", bases.detach().clone())

    def orthonormal_bases(self) -> torch.Tensor:
        """The bases (K, n, d)."""
        return self.bases

    def _bases_for(self, dtype: torch.dtype) -> torch.Tensor:
        return self.bases.to(dtype)


class LowRankDenoiser(_SubspaceDenoiser):
    """P2's parameterised denoiser: the MoLRG posterior mean with learnable bases U (K, n, d).

    The forward pass orthonormalises each U_k by QR (differentiably), so the model is exactly the
    closed-form family with U_k on the Stiefel manifold. Trainable with any denoising loss.
    """

    def __init__(
        self,
        num_classes: int,                                # K: number of subspaces.
        intrinsic_dim: int,                              # d: dimension of each subspace.
        img_resolution: int,                             # R: images are (C, R, R), n = C*R*R.
        img_channels: int = 3,                           # C.
        generator: torch.Generator | int | None = None,  # Initialisation (seed 0 if None).
    ):  # fmt: skip
        super().__init__(img_resolution=img_resolution, img_channels=img_channels)
        n = img_channels * img_resolution**2
        if not 1 <= intrinsic_dim <= n or num_classes < 1:
            raise ValueError(f"need num_classes >= 1 and 1 <= intrinsic_dim <= n = {n}")
        self._init_kwargs = dict(
            num_classes=int(num_classes),
            intrinsic_dim=int(intrinsic_dim),
            img_resolution=int(img_resolution),
            img_channels=int(img_channels),
        )
        g = _generator(generator)
        init = torch.randn(num_classes, n, intrinsic_dim, generator=g, device=g.device, dtype=torch.float64)
        init = torch.linalg.qr(init).Q.to(device="cpu", dtype=torch.float32)
        self.U = torch.nn.Parameter(init)

    @property
    def num_classes(self) -> int:
        return self.U.shape[0]

    @property
    def intrinsic_dim(self) -> int:
        return self.U.shape[2]

    def _bases_for(self, dtype: torch.dtype) -> torch.Tensor:
        return _qr_bases(self.U, dtype)

    def orthonormal_bases(self) -> torch.Tensor:
        """QR-orthonormalised learned bases (K, n, d), detached, in the compute dtype."""
        with torch.no_grad():
            return self._bases_for(_compute_dtype(self.U.device)).detach()


class LowRankStack(_SubspaceDenoiser):
    """M independent :class:`LowRankDenoiser` trained as one module: bases U (M, K, n, d), and images
    that hold the M models' inputs side by side on the channel axis, (N, M*C, R, R).

    Model m reads and writes only channels [m*C, (m+1)*C), so with a loss summed over elements (the
    training loop's) its gradient is exactly its own loss's, and an elementwise optimizer such as Adam
    moves each model as it would move alone on the same batches and noise.
    """

    def __init__(self, members: Sequence[LowRankDenoiser]):
        if not members:
            raise ValueError("LowRankStack needs at least one LowRankDenoiser")
        shapes = {(tuple(m.U.shape), m.img_resolution, m.img_channels) for m in members}
        if len(shapes) != 1:
            raise ValueError(f"stacked models must share K, n, d and the image shape, got {sorted(shapes)}")
        first = members[0]
        super().__init__(img_resolution=first.img_resolution, img_channels=len(members) * first.img_channels)
        self._member_kwargs = dict(first._init_kwargs)
        self.U = torch.nn.Parameter(torch.stack([m.U.detach() for m in members]))

    def _bases_for(self, dtype: torch.dtype) -> torch.Tensor:
        return _qr_bases(self.U, dtype)

    def members(self) -> list[LowRankDenoiser]:
        """The M models, each a :class:`LowRankDenoiser` holding a copy of its bases (K, n, d)."""
        out = []
        for u in self.U.detach():
            net = LowRankDenoiser(**self._member_kwargs)
            with torch.no_grad():
                net.U.copy_(u.to(net.U.dtype))
            out.append(net.to(u.device))
        return out


@dataclass
class MoLRG:
    """Mixture of K low-rank Gaussians in R^n, n = C*R*R: ``bases`` (K, n, d) float64, ``shape`` (C, R, R)."""

    bases: torch.Tensor
    shape: tuple[int, int, int]

    @property
    def num_classes(self) -> int:
        return self.bases.shape[0]

    @property
    def intrinsic_dim(self) -> int:
        return self.bases.shape[2]

    @property
    def dim(self) -> int:
        return self.bases.shape[1]

    @classmethod
    def create(
        cls,
        num_classes: int,                                # K: number of subspaces.
        intrinsic_dim: int,                              # d: dimension of each subspace.
        img_resolution: int,                             # R: images are (C, R, R), n = C*R*R.
        img_channels: int = 3,                           # C.
        generator: torch.Generator | int | None = None,  # Generator or seed (0 if None).
        device: str | torch.device | None = None,        # Where the bases live (CPU if None).
    ) -> MoLRG:  # fmt: skip
        """Random bases: consecutive d-column blocks of Q from the QR of an n x n Gaussian matrix."""
        n = img_channels * img_resolution**2
        if num_classes < 1 or intrinsic_dim < 1:
            raise ValueError(
                f"num_classes and intrinsic_dim must be positive, got {num_classes}, {intrinsic_dim}"
            )
        if num_classes * intrinsic_dim > n:
            raise ValueError(
                f"K*d = {num_classes}*{intrinsic_dim} = {num_classes * intrinsic_dim} exceeds the ambient "
                f"dimension n = {img_channels}*{img_resolution}^2 = {n}: the subspaces cannot be orthogonal"
            )
        g = _generator(generator)
        a = torch.randn(n, n, generator=g, device=g.device, dtype=torch.float64)
        q, r = torch.linalg.qr(a)
        q = q * torch.sign(torch.diagonal(r))  # unique QR: Haar-distributed q
        blocks = q[:, : num_classes * intrinsic_dim].reshape(n, num_classes, intrinsic_dim).permute(1, 0, 2)
        bases = blocks.contiguous().to(device="cpu" if device is None else device)
        return cls(bases=bases, shape=(int(img_channels), int(img_resolution), int(img_resolution)))

    def sample(
        self,
        num_per_class: int,
        generator: torch.Generator | int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean samples x0 = U_k a, class by class: x (K*num_per_class, C, R, R) and int64 labels."""
        g = _generator(generator)
        k, n, d = self.bases.shape
        a = torch.randn(k, num_per_class, d, generator=g, device=g.device, dtype=torch.float64)
        x = torch.einsum("knd,kmd->kmn", self.bases.to(torch.float64), a.to(self.bases.device))
        labels = torch.arange(k, device=self.bases.device).repeat_interleave(num_per_class)
        return x.reshape(k * num_per_class, *self.shape).to(dtype), labels

    def subspace_energy(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """||U_k^T x||^2 / ||x||^2 per point and class, (S, K) float64 (0 for a zero point)."""
        xf = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
        xf = xf.detach().cpu().reshape(len(xf), -1).double()
        energy = torch.einsum("knd,sn->skd", self.bases.cpu().double(), xf).square().sum(-1)
        return energy / xf.square().sum(1, keepdim=True).clamp_min(1e-300)

    def nearest_class(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The subspace holding most of each point's energy, (S,) int64."""
        return self.subspace_energy(x).argmax(1)

    def off_subspace(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Relative distance to the nearest subspace, min_k ||x - U_k U_k^T x|| / ||x||, (S,) float64."""
        return (1 - self.subspace_energy(x).amax(1)).clamp_min(0).sqrt()

    def denoiser(self) -> MoLRGDenoiser:
        """The closed-form posterior-mean denoiser of this mixture."""
        return MoLRGDenoiser(self.bases, self.shape)

    def save(
        self, path: str | os.PathLike, samples: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> Path:
        """Write an ``.npz`` (atomically) with ``bases``, ``shape`` and optionally ``samples``/``labels``."""
        arrays = {"bases": self.bases.detach().cpu().numpy(), "shape": np.asarray(self.shape, dtype=np.int64)}
        if samples is not None:
            arrays["samples"] = samples.detach().cpu().numpy()
        if labels is not None:
            arrays["labels"] = labels.detach().cpu().numpy()
        path = Path(path)
        with atomic_path(path, suffix=".npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        return path

    @staticmethod
    def _read(path: str | os.PathLike) -> dict[str, np.ndarray]:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        try:
            z = np.load(path, allow_pickle=False)
            if not isinstance(z, np.lib.npyio.NpzFile):
                raise ValueError("a single array (.npy), not an .npz archive")
            with z:
                arrays = {k: z[k] for k in z.files}
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from e
        for name, arr in arrays.items():
            if arr.dtype.kind not in "fiub":
                raise ValueError(f"{path}: array '{name}' holds {arr.dtype}, not numbers")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise ValueError(f"{path}: array '{name}' contains NaN or infinite values")
        return arrays

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> MoLRG:
        """Read a mixture written by ``save``; checks the bases' shape and orthonormality."""
        z = cls._read(path)
        if "bases" not in z or "shape" not in z:
            raise ValueError(f"{path}: missing 'bases' or 'shape'")
        bases, shape = z["bases"], tuple(int(v) for v in np.asarray(z["shape"]).reshape(-1))
        if bases.ndim != 3 or len(shape) != 3 or shape[1] != shape[2] or bases.shape[1] != math.prod(shape):
            raise ValueError(f"{path}: bases {bases.shape} do not fit image shape {shape}")
        b = torch.from_numpy(bases).to(torch.float64)
        flat = b.permute(1, 0, 2).reshape(b.shape[1], -1)
        if not torch.allclose(flat.T @ flat, torch.eye(flat.shape[1], dtype=torch.float64), atol=1e-6):
            raise ValueError(f"{path}: bases are not orthonormal and mutually orthogonal")
        return cls(bases=b.to(device="cpu" if device is None else device), shape=shape)

    @classmethod
    def load_samples(cls, path: str | os.PathLike) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The ``samples`` (and ``labels``) stored by ``save``, or None if there are none."""
        z = cls._read(path)
        if "samples" not in z:
            return None
        samples, labels = z["samples"], z.get("labels")
        if samples.ndim != 4 or samples.dtype.kind != "f" or len(samples) == 0:
            raise ValueError(
                f"{path}: 'samples' must be float images (N, C, R, R), got {samples.dtype} {samples.shape}"
            )
        if labels is not None and (labels.shape != (len(samples),) or labels.dtype.kind not in "iu"):
            raise ValueError(
                f"{path}: 'labels' must be {len(samples)} integers, got {labels.dtype} {labels.shape}"
            )
        return torch.from_numpy(samples), None if labels is None else torch.from_numpy(labels)


# ----------------------------------------------------------------------------
# Subspace recovery.


def _assignment(cost: np.ndarray) -> list[int]:
    """Minimum-cost one-to-one assignment of rows to columns (rows <= columns), Hungarian method.

    Returns ``col[i]`` for each row i. O(rows^2 * cols), exact.
    """
    n_rows, n_cols = cost.shape
    inf = float("inf")
    u, v = [0.0] * (n_rows + 1), [0.0] * (n_cols + 1)
    match = [0] * (n_cols + 1)  # match[j] = row (1-based) assigned to column j, 0 = free
    way = [0] * (n_cols + 1)
    for i in range(1, n_rows + 1):
        match[0] = i
        j0 = 0
        minv = [inf] * (n_cols + 1)
        used = [False] * (n_cols + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = match[j0], inf, 0
            for j in range(1, n_cols + 1):
                if not used[j]:
                    cur = cost[i0 - 1, j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(n_cols + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    cols = [0] * n_rows
    for j in range(1, n_cols + 1):
        if match[j]:
            cols[match[j] - 1] = j - 1
    return cols


def _orthonormal(u: torch.Tensor) -> torch.Tensor:
    u = torch.as_tensor(u).detach().to(device="cpu", dtype=torch.float64)
    if u.ndim != 3:
        raise ValueError(f"bases must be shaped (K, n, d), got {tuple(u.shape)}")
    return torch.linalg.qr(u).Q


def subspace_distance(U_learned: torch.Tensor, U_true: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Distance of each true subspace to its matched learned one, and the largest of them.

    Bases are (K, n, d) (columns are orthonormalised first, so any spanning set works). For
    subspaces with projectors P, Q of ranks d1, d2 the distance is ||P - Q||_F / sqrt(d1 + d2)
    (= /sqrt(2d) for equal ranks): 0 for the same subspace, 1 for orthogonal ones, and invariant
    to rotations within a subspace. True subspaces are matched one-to-one to learned ones by the
    assignment that minimises the sum of squared distances (needs K_learned >= K_true).
    Returns (distances (K_true,) float64, max distance).
    """
    ul, ut = _orthonormal(U_learned), _orthonormal(U_true)
    if ul.shape[1] != ut.shape[1]:
        raise ValueError(f"ambient dimensions differ: {ul.shape[1]} vs {ut.shape[1]}")
    if ul.shape[0] < ut.shape[0]:
        raise ValueError(f"{ul.shape[0]} learned subspaces cannot match {ut.shape[0]} true ones")
    cross = torch.einsum("ind,jne->ijde", ut, ul).square().sum((-1, -2))  # ||U_i^T V_j||_F^2
    dl, dt = ul.shape[2], ut.shape[2]
    sq = ((dl + dt - 2 * cross) / (dl + dt)).clamp(min=0)  # (K_true, K_learned)
    cols = _assignment(sq.numpy())
    dist = sq[torch.arange(ut.shape[0]), torch.tensor(cols)].sqrt()
    return dist, float(dist.max())
