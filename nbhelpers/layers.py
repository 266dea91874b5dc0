"""Building blocks of the EDM U-Nets: layers whose parameter names, shapes and init equal NVlabs/edm.

Every layer casts its parameters to the input's dtype, so a float32 model runs float16 inputs
(EDM's mixed precision). Random init draws from ``generator`` when given (on its device), else from
the global generator in the same order as EDM, so a seeded EDM network and ours start identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "weight_init",
    "Linear",
    "Conv2d",
    "GroupNorm",
    "attention",
    "UNetBlock",
    "PositionalEmbedding",
    "FourierEmbedding",
]


def _rand_kwargs(generator: torch.Generator | None) -> dict:
    return {} if generator is None else {"generator": generator, "device": generator.device}


def weight_init(
    shape: Sequence[int],
    mode: str,
    fan_in: int,
    fan_out: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A float32 tensor of ``shape`` drawn with EDM's init ``mode`` (xavier/kaiming, uniform/normal)."""
    kw = _rand_kwargs(generator)
    if mode == "xavier_uniform":
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape, **kw) * 2 - 1)
    if mode == "xavier_normal":
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape, **kw)
    if mode == "kaiming_uniform":
        return math.sqrt(3 / fan_in) * (torch.rand(*shape, **kw) * 2 - 1)
    if mode == "kaiming_normal":
        return math.sqrt(1 / fan_in) * torch.randn(*shape, **kw)
    raise ValueError(f"weight_init: unknown init mode {mode!r}")


class Linear(torch.nn.Module):
    """Fully connected layer ``x @ W^T + b``; W is (out_features, in_features)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1,
        init_bias: float = 0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features, generator=generator)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        # EDM draws the bias even when it is scaled to zero; keep the same random stream.
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)


class Conv2d(torch.nn.Module):
    """Same-padded square convolution with optional 2x up/down-sampling by a separable FIR filter.

    ``kernel=0`` gives a pure resampling layer without weights. The filter (outer product of
    ``resample_filter``, normalised to sum 1) is the buffer ``resample_filter``, present only when
    resampling, as in EDM.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: Sequence[float] = (1, 1),
        fused_resample: bool = False,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1,
        init_bias: float = 0,
        generator: torch.Generator | None = None,
    ):
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be set")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(
            mode=init_mode,
            fan_in=in_channels * kernel * kernel,
            fan_out=out_channels * kernel * kernel,
            generator=generator,
        )
        weight = (
            weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight if kernel else None
        )
        self.weight = torch.nn.Parameter(weight) if kernel else None
        self.bias = (
            torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        )
        taps = torch.as_tensor(list(resample_filter), dtype=torch.float32)
        filt = torch.outer(taps, taps)[None, None] / taps.sum().square()
        self.register_buffer("resample_filter", filt if (up or down) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            up_f = (f * 4).tile([self.in_channels, 1, 1, 1])
            x = F.conv_transpose2d(x, up_f, groups=self.in_channels, stride=2, padding=w_pad + f_pad)
            x = F.conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                up_f = (f * 4).tile([self.in_channels, 1, 1, 1])
                x = F.conv_transpose2d(x, up_f, groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                down_f = f.tile([self.in_channels, 1, 1, 1])
                x = F.conv2d(x, down_f, groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    """Group normalisation with ``min(num_groups, num_channels // min_channels_per_group)`` groups."""

    def __init__(
        self,
        num_channels: int,
        num_groups: int = 32,
        min_channels_per_group: int = 4,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype)
        b = self.bias.to(x.dtype)
        return F.group_norm(x, num_groups=self.num_groups, weight=w, bias=b, eps=self.eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention on (B, c, L) tensors (c channels per head, L positions) -> (B, c, L) in the
    dtype of ``q``.

    EDM's form (float32 softmax weights, then weights @ values): bit-identical to EDM on CPU. The
    fused ``scaled_dot_product_attention`` agrees to ~1e-6 but measured no faster (slower on CPU, and
    on an H200 for the CIFAR-10/ImageNet-64 shapes).
    """
    logits = torch.einsum("bcq,bck->bqk", q.to(torch.float32), (k / math.sqrt(k.shape[1])).to(torch.float32))
    weights = logits.softmax(dim=2).to(q.dtype)
    return torch.einsum("bqk,bck->bcq", weights, v)


class UNetBlock(torch.nn.Module):
    """Residual block of DDPM++/NCSN++/ADM: GroupNorm-SiLU-Conv, noise-embedding modulation,
    optional 2x resampling and optional multi-head self-attention (qkv interleaved per head).
    """

    def __init__(
        self,
        in_channels: int,                           # Input channels.
        out_channels: int,                          # Output channels.
        emb_channels: int,                          # Width of the noise embedding vector.
        up: bool = False,                           # Upsample 2x?
        down: bool = False,                         # Downsample 2x?
        attention: bool = False,                    # Self-attention after the residual branch?
        num_heads: int | None = None,               # Heads; None: out_channels // channels_per_head.
        channels_per_head: int = 64,                # Used when num_heads is None.
        dropout: float = 0.0,                       # Dropout before conv1.
        skip_scale: float = 1.0,                    # Scale after each residual sum.
        eps: float = 1e-5,                          # GroupNorm epsilon.
        resample_filter: Sequence[float] = (1, 1),  # FIR taps for resampling.
        resample_proj: bool = False,                # 1x1 conv on the resampled skip path?
        adaptive_scale: bool = True,                # Embedding gives scale and shift (ADM) or only shift?
        init: dict | None = None,                   # Init kwargs for conv0, affine, skip.
        init_zero: dict | None = None,              # Init kwargs for conv1, proj.
        init_attn: dict | None = None,              # Init kwargs for qkv; None = init.
        generator: torch.Generator | None = None,
    ):  # fmt: skip
        super().__init__()
        init = dict(init or {}, generator=generator)
        init_zero = dict(init_zero if init_zero is not None else {"init_weight": 0}, generator=generator)
        init_attn = dict(init_attn, generator=generator) if init_attn is not None else init
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(
            in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init
        )
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(
                in_channels,
                out_channels,
                kernel=kernel,
                up=up,
                down=down,
                resample_filter=resample_filter,
                **init,
            )

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (N, in_channels, H, W); emb: (N, emb_channels). Returns (N, out_channels, H', W')."""
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            n, c, h, w = x.shape
            heads = self.num_heads
            q, k, v = self.qkv(self.norm2(x)).reshape(n * heads, c // heads, 3, h * w).unbind(2)
            a = attention(q, k, v)
            x = (self.proj(a.reshape(n, c, h, w)) + x) * self.skip_scale
        return x


class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding (N,) -> (N, num_channels): [cos(x f_j), sin(x f_j)] with f_j = P^(-j/J),
    P = ``max_positions``."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features (N,) -> (N, num_channels): [cos(2 pi x f), sin(2 pi x f)], f ~ N(0, scale^2).

    The frequencies are the buffer ``freqs`` (saved in the state_dict, as in EDM).
    """

    def __init__(self, num_channels: int, scale: float = 16, generator: torch.Generator | None = None):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2, **_rand_kwargs(generator)) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
