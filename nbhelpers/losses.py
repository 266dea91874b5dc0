"""Denoising score-matching losses of EDM (Karras et al. 2022): VP, VE and EDM noise distributions.

A loss draws a noise level sigma per sample, optionally augments the images, adds Gaussian noise
and returns the weighted squared error of the denoiser, per element. All randomness comes from an
explicit ``torch.Generator``. The draws are split from the evaluation (``draw`` then ``evaluate``)
so that a trainer can draw once for a whole batch and evaluate it in slices: the result then does
not depend on how the batch is split into accumulation rounds or processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nbhelpers.augment import AugmentPipe


@dataclass
class LossDraws:
    """The random draws of one loss evaluation: sigma (N,), unit noise (N,C,H,W), augmentation params."""

    sigma: torch.Tensor
    noise: torch.Tensor
    augment: dict[str, torch.Tensor] | None = None

    def __getitem__(self, index: slice | torch.Tensor) -> LossDraws:
        """The draws of a subset of the samples (a slice or an index tensor along the batch)."""
        aug = None if self.augment is None else {k: v[index] for k, v in self.augment.items()}
        return LossDraws(self.sigma[index], self.noise[index], aug)

    def __len__(self) -> int:
        return self.sigma.shape[0]


class DenoisingLoss:
    """Base class: weighted denoising loss ``weight(sigma) * (D(y + sigma n; sigma) - y)^2``."""

    def sample_sigma(self, n: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
        """Draw ``n`` noise levels, shape (n,), float32, on ``device``."""
        raise NotImplementedError

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """Loss weight lambda(sigma), same shape as ``sigma``."""
        raise NotImplementedError

    def draw(
        self,
        shape: tuple[int, ...] | torch.Size,
        generator: torch.Generator,
        device: torch.device | str,
        augment_pipe: AugmentPipe | None = None,
    ) -> LossDraws:
        """Draw sigma, augmentation parameters and unit noise for a batch of ``shape`` = (N,C,H,W).

        The order (sigma, augmentation, noise) is fixed, so equal generator states give equal draws.
        """
        n = int(shape[0])
        sigma = self.sample_sigma(n, generator, device)
        aug = augment_pipe.draw(n, generator, device) if augment_pipe is not None else None
        noise = torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
        return LossDraws(sigma, noise, aug)

    def evaluate(
        self,
        net: torch.nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        draws: LossDraws,
        augment_pipe: AugmentPipe | None = None,
    ) -> torch.Tensor:
        """Per-element loss (N,C,H,W), float32, for clean ``images`` with the given draws."""
        if len(draws) != images.shape[0]:
            raise ValueError(f"draws hold {len(draws)} samples but images hold {images.shape[0]}")
        sigma = draws.sigma.to(images.dtype).reshape(-1, 1, 1, 1)
        y, augment_labels = images, None
        if augment_pipe is not None:
            if draws.augment is None:
                raise ValueError("an augment_pipe was given but the draws hold no augmentation parameters")
            y, augment_labels = augment_pipe.apply(images, draws.augment)
        noisy = y + draws.noise.to(y.dtype) * sigma
        if augment_labels is None:
            denoised = net(noisy, sigma, labels)
        else:
            denoised = net(noisy, sigma, labels, augment_labels=augment_labels)
        err = denoised.to(torch.float32) - y.to(torch.float32)
        return self.weight(sigma.to(torch.float32)) * err.square()

    def __call__(
        self,
        net: torch.nn.Module,
        images: torch.Tensor,
        labels: torch.Tensor | None,
        generator: torch.Generator,
        augment_pipe: AugmentPipe | None = None,
    ) -> torch.Tensor:
        """Per-element loss (N,C,H,W) for clean ``images`` in model space; randomness from ``generator``."""
        draws = self.draw(images.shape, generator, images.device, augment_pipe)
        return self.evaluate(net, images, labels, draws, augment_pipe)


class VPLoss(DenoisingLoss):
    """Variance-preserving loss: t ~ U(epsilon_t, 1), sigma = VP sigma(t), weight 1/sigma^2."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d = float(beta_d)  # Extent of the noise level schedule.
        self.beta_min = float(beta_min)  # Initial slope of the noise level schedule.
        self.epsilon_t = float(epsilon_t)  # Smallest sampled time t.

    def sigma(self, t: torch.Tensor | float) -> torch.Tensor:
        """VP noise level sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = torch.as_tensor(t)
        return torch.expm1(0.5 * self.beta_d * t.square() + self.beta_min * t).sqrt()

    def sample_sigma(self, n: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
        return self.sigma(1 + u * (self.epsilon_t - 1))

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma.square()


class VELoss(DenoisingLoss):
    """Variance-exploding loss: sigma log-uniform in [sigma_min, sigma_max], weight 1/sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100.0):
        self.sigma_min = float(sigma_min)  # Smallest sampled noise level.
        self.sigma_max = float(sigma_max)  # Largest sampled noise level.

    def sample_sigma(self, n: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1 / sigma.square()


class EDMLoss(DenoisingLoss):
    """EDM loss: ln sigma ~ N(P_mean, P_std^2), weight (sigma^2 + sd^2) / (sigma sd)^2."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean = float(P_mean)  # Mean of ln(sigma).
        self.P_std = float(P_std)  # Standard deviation of ln(sigma).
        self.sigma_data = float(sigma_data)  # Expected standard deviation of the data.

    def sample_sigma(self, n: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
        z = torch.randn(n, generator=generator, device=device, dtype=torch.float32)
        return (z * self.P_std + self.P_mean).exp()

    def weight(self, sigma: torch.Tensor) -> torch.Tensor:
        sd2 = self.sigma_data**2
        return (sigma.square() + sd2) / (sigma.square() * sd2)


LOSSES: dict[str, type[DenoisingLoss]] = {"vp": VPLoss, "ve": VELoss, "edm": EDMLoss}


def make_loss(name: str, **kwargs: float) -> DenoisingLoss:
    """The loss named ``name`` ('vp', 've' or 'edm'), with optional constructor overrides."""
    key = name.lower()
    if key not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
    return LOSSES[key](**kwargs)
