"""EDM-style geometric data augmentation with conditioning labels (Karras et al. 2022, after ADA).

Each transform fires per sample with probability ``multiplier * p``; its parameters are appended
to ``augment_labels`` in EDM's order, so a network built with ``augment_dim=label_dim`` learns to
undo them and is sampled with zero labels. EDM's CIFAR-10 setting (``EDM_AUGMENT_KWARGS``) gives the
9 labels: xflip, yflip, scale, rotate_frac (cos - 1, sin), aniso (2), translate_frac (2).

Differences from EDM: no colour transforms; geometric transforms resample once with bilinear
``grid_sample`` and reflection padding at the native resolution (EDM upsamples 2x with a wavelet
filter first, and reflects without repeating the edge pixel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

EDM_AUGMENT_KWARGS: dict[str, float] = dict(
    xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1
)

_LABEL_WIDTHS = dict(
    xflip=1, yflip=1, rotate_int=2, translate_int=2, scale=1, rotate_frac=2, aniso=2, translate_frac=2
)


def _rotate(theta: torch.Tensor) -> torch.Tensor:
    """Batched 3x3 rotation matrices (N,3,3) by angle ``theta`` (N,) in radians."""
    c, s = theta.cos(), theta.sin()
    z, o = torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(-1, 3, 3)


def _scale(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    """Batched 3x3 scaling matrices (N,3,3)."""
    z, o = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, z, z, z, sy, z, z, z, o], dim=-1).reshape(-1, 3, 3)


def _translate(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    """Batched 3x3 translation matrices (N,3,3), offsets in pixels."""
    z, o = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([o, z, tx, z, o, ty, z, z, o], dim=-1).reshape(-1, 3, 3)


def _reflect_index(i: torch.Tensor, size: int) -> torch.Tensor:
    """Map integer positions onto [0, size) by mirror reflection without repeating the edge."""
    if size == 1:
        return torch.zeros_like(i)
    period = 2 * size - 2
    return (size - 1) - ((size - 1) - i.remainder(period)).abs()


class AugmentPipe:
    """Per-sample random flips, integer translation and rotation, and affine warps with labels.

    Call ``pipe(images, generator) -> (images, labels)``, or ``draw`` then ``apply`` to draw the
    parameters of a large batch once and apply them in slices.
    """

    def __init__(
        self,
        p: float = 1.0,
        xflip: float = 0,
        yflip: float = 0,
        rotate_int: float = 0,
        translate_int: float = 0,
        translate_int_max: float = 0.125,
        scale: float = 0,
        rotate_frac: float = 0,
        aniso: float = 0,
        translate_frac: float = 0,
        scale_std: float = 0.2,
        rotate_frac_max: float = 1,
        aniso_std: float = 0.2,
        aniso_rotate_prob: float = 0.5,
        translate_frac_std: float = 0.125,
    ):
        self.p = float(p)  # Overall multiplier of the probabilities below.
        self.xflip = float(xflip)  # Probability multiplier of a horizontal flip.
        self.yflip = float(yflip)  # Probability multiplier of a vertical flip.
        self.rotate_int = float(rotate_int)  # Probability multiplier of a 90-degree rotation.
        self.translate_int = float(translate_int)  # Probability multiplier of an integer translation.
        self.translate_int_max = float(translate_int_max)  # Largest integer translation, fraction of size.
        self.scale = float(scale)  # Probability multiplier of isotropic scaling.
        self.rotate_frac = float(rotate_frac)  # Probability multiplier of arbitrary rotation.
        self.aniso = float(aniso)  # Probability multiplier of anisotropic scaling.
        self.translate_frac = float(translate_frac)  # Probability multiplier of fractional translation.
        self.scale_std = float(scale_std)  # Log2 standard deviation of isotropic scaling.
        self.rotate_frac_max = float(rotate_frac_max)  # Rotation range, 1 = full circle.
        self.aniso_std = float(aniso_std)  # Log2 standard deviation of anisotropic scaling.
        self.aniso_rotate_prob = float(aniso_rotate_prob)  # Probability of a rotated anisotropy axis.
        self.translate_frac_std = float(translate_frac_std)  # Std of fractional translation, rel. size.

    @property
    def enabled(self) -> list[str]:
        """Names of the transforms with a nonzero probability multiplier, in label order."""
        return [k for k in _LABEL_WIDTHS if getattr(self, k) > 0]

    @property
    def label_dim(self) -> int:
        """Width of ``augment_labels`` (the network's ``augment_dim``)."""
        return sum(_LABEL_WIDTHS[k] for k in self.enabled)

    def to_dict(self) -> dict[str, float]:
        """Constructor arguments, JSON-serialisable."""
        return dict(vars(self))

    def draw(self, n: int, generator: torch.Generator, device: torch.device | str) -> dict[str, torch.Tensor]:
        """Draw the per-sample parameters of ``n`` augmentations; every tensor has leading dim ``n``."""

        def rand(*shape: int) -> torch.Tensor:
            return torch.rand(shape, generator=generator, device=device)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(shape, generator=generator, device=device)

        def fires(mult: float) -> torch.Tensor:
            return rand(n) < mult * self.p

        out: dict[str, torch.Tensor] = {}
        if self.xflip > 0:
            w = torch.randint(2, (n,), generator=generator, device=device)
            out["xflip"] = w * fires(self.xflip)
        if self.yflip > 0:
            w = torch.randint(2, (n,), generator=generator, device=device)
            out["yflip"] = w * fires(self.yflip)
        if self.rotate_int > 0:
            w = torch.randint(4, (n,), generator=generator, device=device)
            out["rotate_int"] = w * fires(self.rotate_int)
        if self.translate_int > 0:
            w = rand(n, 2) * 2 - 1
            out["translate_int"] = w * fires(self.translate_int)[:, None]
        if self.scale > 0:
            w = randn(n)
            out["scale"] = w * fires(self.scale)
        if self.rotate_frac > 0:
            w = (rand(n) * 2 - 1) * (math.pi * self.rotate_frac_max)
            out["rotate_frac"] = w * fires(self.rotate_frac)
        if self.aniso > 0:
            w = randn(n)
            r = (rand(n) * 2 - 1) * math.pi
            out["aniso"] = w * fires(self.aniso)
            out["aniso_angle"] = r * (rand(n) < self.aniso_rotate_prob)
        if self.translate_frac > 0:
            w = randn(n, 2)
            out["translate_frac"] = w * fires(self.translate_frac)[:, None]
        return out

    def apply(
        self, images: torch.Tensor, params: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply drawn ``params`` to ``images`` (N,C,H,W); returns (images, labels (N, label_dim) float32)."""
        N, C, H, W = images.shape
        labels: list[torch.Tensor] = []

        def flag(key: str, value: int) -> torch.Tensor:
            return (params[key] == value).reshape(N, 1, 1, 1)

        if "xflip" in params:
            images = torch.where(flag("xflip", 1), images.flip(3), images)
            labels.append(params["xflip"])
        if "yflip" in params:
            images = torch.where(flag("yflip", 1), images.flip(2), images)
            labels.append(params["yflip"])
        if "rotate_int" in params:
            if H != W:
                raise ValueError(f"90-degree rotation needs square images, got {H}x{W}")
            w = params["rotate_int"].reshape(N, 1, 1, 1)
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if "translate_int" in params:
            w = params["translate_int"]
            tx = (w[:, 0] * (W * self.translate_int_max)).round().long()
            ty = (w[:, 1] * (H * self.translate_int_max)).round().long()
            xs = _reflect_index(torch.arange(W, device=images.device)[None] - tx[:, None], W)  # (N, W)
            ys = _reflect_index(torch.arange(H, device=images.device)[None] - ty[:, None], H)  # (N, H)
            images = images.gather(3, xs[:, None, None, :].expand(N, C, H, W))
            images = images.gather(2, ys[:, None, :, None].expand(N, C, H, W))
            labels += [tx / (W * self.translate_int_max), ty / (H * self.translate_int_max)]

        G_inv = None  # Maps output pixel coordinates (origin at the centre) to input coordinates.

        def compose(m: torch.Tensor) -> None:
            nonlocal G_inv
            G_inv = m if G_inv is None else G_inv @ m

        if "scale" in params:
            w = params["scale"]
            s = torch.exp2(w * self.scale_std)
            compose(_scale(1 / s, 1 / s))
            labels.append(w)
        if "rotate_frac" in params:
            w = params["rotate_frac"]
            compose(_rotate(w))
            labels += [w.cos() - 1, w.sin()]
        if "aniso" in params:
            w, r = params["aniso"], params["aniso_angle"]
            s = torch.exp2(w * self.aniso_std)
            compose(_rotate(-r) @ _scale(1 / s, s) @ _rotate(r))
            labels += [w * r.cos(), w * r.sin()]
        if "translate_frac" in params:
            w = params["translate_frac"]
            compose(
                _translate(-w[:, 0] * (W * self.translate_frac_std), -w[:, 1] * (H * self.translate_frac_std))
            )
            labels += [w[:, 0], w[:, 1]]

        if G_inv is not None:
            to_norm = torch.diag(torch.tensor([2 / W, 2 / H, 1.0], device=images.device))
            from_norm = torch.diag(torch.tensor([W / 2, H / 2, 1.0], device=images.device))
            theta = (to_norm @ G_inv @ from_norm)[:, :2, :].to(images.dtype)
            grid = F.affine_grid(theta, [N, C, H, W], align_corners=False)
            images = F.grid_sample(
                images, grid, mode="bilinear", padding_mode="reflection", align_corners=False
            )

        if labels:
            out = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        else:
            out = torch.zeros(N, 0, device=images.device)
        return images, out

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment ``images`` (N,C,H,W); returns (images, labels (N, label_dim))."""
        return self.apply(images, self.draw(images.shape[0], generator, images.device))


def make_augment_pipe(p: float, **overrides: float) -> AugmentPipe | None:
    """EDM's CIFAR-10 augmentation set (9 labels) at probability ``p``, or None when ``p == 0``."""
    if p < 0 or p > 1:
        raise ValueError(f"augmentation probability must be in [0, 1], got {p}")
    if p == 0:
        return None
    return AugmentPipe(p=p, **{**EDM_AUGMENT_KWARGS, **overrides})
