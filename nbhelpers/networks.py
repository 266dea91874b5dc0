"""Denoiser networks compatible with NVlabs/edm: SongUNet (DDPM++/NCSN++), DhariwalUNet (ADM), a small
MLP for vector data, and the VP/VE/EDM preconditioners that turn a raw network F into a denoiser D.

Parameter and buffer names and shapes equal EDM's, so an EDM ``state_dict`` loads with ``strict=True``.
``make_network(arch, precond, ...)`` builds the presets of EDM's ``train.py``; ``network_kwargs`` gives
the same as a JSON-friendly dict that ``build_network`` turns back into a network.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nbhelpers.layers import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    Linear,
    PositionalEmbedding,
    UNetBlock,
)

__all__ = [
    "SongUNet",
    "DhariwalUNet",
    "MLP",
    "VPPrecond",
    "VEPrecond",
    "EDMPrecond",
    "MODELS",
    "ARCHS",
    "PRECONDS",
    "network_kwargs",
    "build_network",
    "make_network",
]


def _drop_labels(labels: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole label rows with probability ``p`` during training (classifier-free guidance)."""
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


def _check_resolution(name: str, img_resolution: int, levels: int) -> None:
    if img_resolution % (1 << (levels - 1)):
        raise ValueError(
            f"{name}: img_resolution {img_resolution} is not divisible by 2^{levels - 1} "
            f"(channel_mult has {levels} levels)"
        )


_SONG_OPTIONS = {
    "embedding_type": ("positional", "fourier"),
    "encoder_type": ("standard", "skip", "residual"),
    "decoder_type": ("standard", "skip"),
}


@dataclass
class _Levels:
    """What SongUNet's encoder and decoder share: the resolutions, widths and block settings."""

    img_resolution: int
    model_channels: int
    channel_mult: Sequence[int]
    num_blocks: int
    attn_resolutions: Sequence[int]
    resample_filter: Sequence[float]
    block_kwargs: dict  # UNetBlock keyword arguments
    init: dict  # init of the plain layers


def _song_encoder(lv: _Levels, in_channels: int, encoder_type: str) -> tuple[torch.nn.ModuleDict, int]:
    """SongUNet's encoder in EDM's order (the random init draws in that order), and its output width."""
    enc = torch.nn.ModuleDict()
    kw, init, rf = lv.block_kwargs, lv.init, lv.resample_filter
    cout = caux = in_channels
    for level, mult in enumerate(lv.channel_mult):
        res = lv.img_resolution >> level
        if level == 0:
            cin, cout = cout, lv.model_channels
            enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
        else:
            enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **kw)
            if encoder_type == "skip":
                enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True, resample_filter=rf)
                enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
            if encoder_type == "residual":
                enc[f"{res}x{res}_aux_residual"] = Conv2d(
                    caux, cout, kernel=3, down=True, resample_filter=rf, fused_resample=True, **init
                )
                caux = cout
        for idx in range(lv.num_blocks):
            cin, cout = cout, lv.model_channels * mult
            attn = res in lv.attn_resolutions
            enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **kw)
    return enc, cout


def _song_decoder(
    lv: _Levels, cout: int, skips: list[int], out_channels: int, decoder_type: str, init_zero: dict
) -> torch.nn.ModuleDict:
    """SongUNet's decoder in EDM's order, from the encoder's width ``cout`` and its skip widths."""
    dec = torch.nn.ModuleDict()
    kw, top = lv.block_kwargs, len(lv.channel_mult) - 1
    for level, mult in reversed(list(enumerate(lv.channel_mult))):
        res = lv.img_resolution >> level
        if level == top:
            dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **kw)
            dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **kw)
        else:
            dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **kw)
        for idx in range(lv.num_blocks + 1):
            cin, cout = cout + skips.pop(), lv.model_channels * mult
            attn = idx == lv.num_blocks and res in lv.attn_resolutions
            dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **kw)
        if decoder_type == "skip" or level == 0:
            if decoder_type == "skip" and level < top:
                dec[f"{res}x{res}_aux_up"] = Conv2d(
                    out_channels, out_channels, kernel=0, up=True, resample_filter=lv.resample_filter
                )
            dec[f"{res}x{res}_aux_norm"] = GroupNorm(num_channels=cout, eps=1e-6)
            dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)
    return dec


class SongUNet(torch.nn.Module):
    """DDPM++ / NCSN++ U-Net of Song et al. as re-implemented in EDM.

    forward(x (N, in_channels, R, R), noise_labels (N,), class_labels (N, label_dim) or None,
    augment_labels (N, augment_dim) or None) -> (N, out_channels, R, R).
    """

    def __init__(
        self,
        img_resolution: int,                         # Image resolution at input/output.
        in_channels: int,                            # Color channels at input.
        out_channels: int,                           # Color channels at output.
        label_dim: int = 0,                          # Number of class labels, 0 = unconditional.
        augment_dim: int = 0,                        # Augmentation label size, 0 = no augmentation.
        model_channels: int = 128,                   # Base channel count.
        channel_mult: Sequence[int] = (1, 2, 2, 2),  # Channel multiplier per resolution.
        channel_mult_emb: int = 4,                   # Embedding width = model_channels * this.
        num_blocks: int = 4,                         # Residual blocks per resolution.
        attn_resolutions: Sequence[int] = (16,),     # Resolutions with self-attention.
        dropout: float = 0.10,                       # Dropout probability inside blocks.
        label_dropout: float = 0,                    # Class-label dropout probability.
        embedding_type: str = "positional",          # 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise: int = 1,                 # Noise embedding width = model_channels * this.
        encoder_type: str = "standard",              # 'standard', 'skip' or 'residual' (NCSN++).
        decoder_type: str = "standard",              # 'standard' or 'skip'.
        resample_filter: Sequence[float] = (1, 1),   # [1,1] (DDPM++) or [1,3,3,1] (NCSN++).
        generator: torch.Generator | None = None,    # Source of the random init (None: global RNG).
    ):  # fmt: skip
        options = dict(embedding_type=embedding_type, encoder_type=encoder_type, decoder_type=decoder_type)
        for name, value in options.items():
            if value not in _SONG_OPTIONS[name]:
                raise ValueError(f"SongUNet: {name} must be one of {_SONG_OPTIONS[name]}, got {value!r}")
        _check_resolution("SongUNet", img_resolution, len(channel_mult))
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        g = dict(generator=generator)
        init_base = dict(init_mode="xavier_uniform")
        zero_base = dict(init_mode="xavier_uniform", init_weight=1e-5)
        attn_base = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        init = dict(init_base, **g)
        init_zero = dict(zero_base, **g)
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5)
        )
        block_kwargs.update(
            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False
        )
        block_kwargs.update(init=init_base, init_zero=zero_base, init_attn=attn_base, generator=generator)

        # Mapping of noise level, class and augmentation labels to the embedding vector.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels, **g)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder and decoder.
        lv = _Levels(
            img_resolution,
            model_channels,
            channel_mult,
            num_blocks,
            attn_resolutions,
            resample_filter,
            block_kwargs,
            init,
        )
        self.enc, cout = _song_encoder(lv, in_channels, encoder_type)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]
        self.dec = _song_decoder(lv, cout, skips, out_channels, decoder_type, init_zero)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Embedding; EDM orders the positional features as [sin, cos].
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        # Encoder: every non-aux output is a skip connection.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder: concatenate a skip whenever a block expects more channels.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


class DhariwalUNet(torch.nn.Module):
    """ADM U-Net of Dhariwal & Nichol as re-implemented in EDM.

    forward(x (N, in_channels, R, R), noise_labels (N,), class_labels (N, label_dim) or None,
    augment_labels (N, augment_dim) or None) -> (N, out_channels, R, R).
    """

    def __init__(
        self,
        img_resolution: int,                            # Image resolution at input/output.
        in_channels: int,                               # Color channels at input.
        out_channels: int,                              # Color channels at output.
        label_dim: int = 0,                             # Number of class labels, 0 = unconditional.
        augment_dim: int = 0,                           # Augmentation label size, 0 = no augmentation.
        model_channels: int = 192,                      # Base channel count.
        channel_mult: Sequence[int] = (1, 2, 3, 4),     # Channel multiplier per resolution.
        channel_mult_emb: int = 4,                      # Embedding width = model_channels * this.
        num_blocks: int = 3,                            # Residual blocks per resolution.
        attn_resolutions: Sequence[int] = (32, 16, 8),  # Resolutions with self-attention.
        dropout: float = 0.10,                          # Dropout probability inside blocks.
        label_dropout: float = 0,                       # Class-label dropout probability.
        generator: torch.Generator | None = None,       # Source of the random init (None: global RNG).
    ):  # fmt: skip
        _check_resolution("DhariwalUNet", img_resolution, len(channel_mult))
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        g = dict(generator=generator)
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(
            emb_channels=emb_channels,
            channels_per_head=64,
            dropout=dropout,
            init=init,
            init_zero=init_zero,
            generator=generator,
        )

        # Mapping.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (
            Linear(augment_dim, model_channels, bias=False, **init_zero, **g) if augment_dim else None
        )
        self.map_layer0 = Linear(model_channels, emb_channels, **init, **g)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init, **g)
        label_init = dict(init_mode="kaiming_normal", init_weight=math.sqrt(label_dim), **g)
        self.map_label = Linear(label_dim, emb_channels, bias=False, **label_init) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init, **g)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero, **g)

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


class _MLPBlock(torch.nn.Module):
    """Pre-norm residual block h + fc1(dropout(silu(fc0(silu(norm(h))) + affine(emb))))."""

    def __init__(self, width: int, emb_channels: int, dropout: float, generator: torch.Generator | None):
        super().__init__()
        self.dropout = dropout
        init = dict(init_mode="xavier_uniform", generator=generator)
        self.norm = GroupNorm(num_channels=width, num_groups=1)
        self.fc0 = Linear(width, width, **init)
        self.affine = Linear(emb_channels, width, **init)
        self.fc1 = Linear(width, width, init_mode="xavier_uniform", init_weight=1e-5, generator=generator)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        y = self.fc0(F.silu(self.norm(h))) + self.affine(emb).to(h.dtype)
        y = self.fc1(F.dropout(F.silu(y), p=self.dropout, training=self.training))
        return h + y


class MLP(torch.nn.Module):
    """Small residual MLP denoiser for vector data stored as images.

    Flattens x (N, in_channels, R, R) to (N, in_channels*R*R) in C order, conditions every block on a
    positional noise embedding (plus optional class/augment labels) and returns (N, out_channels, R, R).
    """

    def __init__(
        self,
        img_resolution: int,                       # Side R of the (C, R, R) "image" holding a vector.
        in_channels: int,                          # Channels C at input.
        out_channels: int,                         # Channels at output.
        label_dim: int = 0,                        # Number of class labels, 0 = unconditional.
        augment_dim: int = 0,                      # Augmentation label size, 0 = no augmentation.
        hidden_dim: int = 256,                     # Width of the hidden layers.
        num_layers: int = 4,                       # Number of residual blocks.
        emb_dim: int = 128,                        # Width of the noise embedding.
        dropout: float = 0.0,                      # Dropout probability inside blocks.
        label_dropout: float = 0,                  # Class-label dropout probability.
        generator: torch.Generator | None = None,  # Source of the random init (None: global RNG).
    ):  # fmt: skip
        super().__init__()
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dropout = label_dropout
        n_in = in_channels * img_resolution * img_resolution
        n_out = out_channels * img_resolution * img_resolution
        init = dict(init_mode="xavier_uniform", generator=generator)
        self.map_noise = PositionalEmbedding(num_channels=emb_dim, endpoint=True)
        self.map_label = Linear(label_dim, emb_dim, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, emb_dim, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(emb_dim, emb_dim, **init)
        self.map_layer1 = Linear(emb_dim, emb_dim, **init)
        self.inp = Linear(n_in, hidden_dim, **init)
        self.blocks = torch.nn.ModuleList(
            _MLPBlock(hidden_dim, emb_dim, dropout, generator) for _ in range(num_layers)
        )
        self.out_norm = GroupNorm(num_channels=hidden_dim, num_groups=1)
        self.out = Linear(
            hidden_dim, n_out, init_mode="xavier_uniform", init_weight=1e-5, generator=generator
        )

    def forward(
        self,
        x: torch.Tensor,
        noise_labels: torch.Tensor,
        class_labels: torch.Tensor | None,
        augment_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        n = x.shape[0]
        emb = self.map_noise(noise_labels)
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))
        h = self.inp(x.reshape(n, -1))
        for block in self.blocks:
            h = block(h, emb)
        out = self.out(F.silu(self.out_norm(h)))
        return out.reshape(n, self.out_channels, self.img_resolution, self.img_resolution)


MODELS: dict[str, type[torch.nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet, "MLP": MLP}


class _Precond(torch.nn.Module):
    """Shared machinery: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), F the model at ``.model``.

    Subclasses define ``coefficients(sigma) -> (c_skip, c_out, c_in, c_noise)``, each shaped like sigma.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        use_fp16: bool,
        model_type: str,
        precond_kwargs: dict,
        model_kwargs: dict,
        generator: torch.Generator | None,
    ):
        super().__init__()
        if model_type not in MODELS:
            raise ValueError(
                f"{type(self).__name__}: unknown model_type {model_type!r}; expected one of {sorted(MODELS)}"
            )
        self._init_args = ()
        self._init_kwargs = copy.deepcopy(
            dict(
                img_resolution=img_resolution,
                img_channels=img_channels,
                label_dim=label_dim,
                use_fp16=use_fp16,
                **precond_kwargs,
                model_type=model_type,
                **model_kwargs,
            )
        )
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = MODELS[model_type](
            img_resolution=img_resolution,
            in_channels=img_channels,
            out_channels=img_channels,
            label_dim=label_dim,
            generator=generator,
            **model_kwargs,
        )
        if generator is not None:  # weights were drawn on the generator's device; keep buffers there too
            self.model.to(generator.device)

    def round_sigma(self, sigma) -> torch.Tensor:
        """Noise levels the network supports; continuous here, so ``sigma`` as a tensor."""
        return torch.as_tensor(sigma)

    def _sigma_column(self, sigma, x: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32)
        n = x.shape[0]
        if sigma.numel() == 1:
            sigma = sigma.reshape(1).expand(n)
        elif sigma.numel() == n:
            sigma = sigma.reshape(n)
        else:
            raise ValueError(
                f"{type(self).__name__}: sigma with shape "
                f"{tuple(sigma.shape)} does not match a batch of {n}; "
                "give a scalar, (N,) or (N, 1, 1, 1)"
            )
        return sigma.reshape(n, *([1] * (x.ndim - 1)))

    def _class_labels(self, class_labels, x: torch.Tensor) -> torch.Tensor | None:
        if self.label_dim == 0:
            return None
        n = x.shape[0]
        if class_labels is None:
            return torch.zeros([n, self.label_dim], device=x.device)
        class_labels = torch.as_tensor(class_labels, device=x.device)
        if not class_labels.is_floating_point():
            class_labels = F.one_hot(class_labels.reshape(-1).long(), self.label_dim)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def forward(
        self,
        x: torch.Tensor,
        sigma,
        class_labels: torch.Tensor | None = None,
        force_fp32: bool = False,
        **model_kwargs,
    ) -> torch.Tensor:
        """Denoised estimate D(x; sigma), float32, shaped like x.

        x: (N, C, R, R) float32/float64; sigma: python float, 0-d, (N,) or (N,1,1,1); class_labels:
        (N, label_dim) one-hot floats or (N,) integer classes. ``model_kwargs`` (e.g. augment_labels)
        go to the model.
        """
        x = x.to(torch.float32)
        sigma = self._sigma_column(sigma, x)
        class_labels = self._class_labels(class_labels, x)
        use_half = self.use_fp16 and not force_fp32 and x.device.type == "cuda"
        dtype = torch.float16 if use_half else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        autocast = torch.is_autocast_enabled(x.device.type)  # autocast picks its own dtypes
        if F_x.dtype != dtype and not autocast:
            raise RuntimeError(f"{type(self).__name__}: model returned {F_x.dtype}, expected {dtype}")
        return c_skip * x + c_out * F_x.to(torch.float32)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (Song et al.'s VP SDE, EDM Table 1)."""

    def __init__(
        self,
        img_resolution: int,                       # Image resolution.
        img_channels: int,                         # Number of color channels.
        label_dim: int = 0,                        # Number of class labels, 0 = unconditional.
        use_fp16: bool = False,                    # Run the model in float16 (CUDA only)?
        beta_d: float = 19.9,                      # Extent of the noise level schedule.
        beta_min: float = 0.1,                     # Initial slope of the noise level schedule.
        M: int = 1000,                             # Number of DDPM timesteps.
        epsilon_t: float = 1e-5,                   # Smallest t used in training.
        model_type: str = "SongUNet",              # Class name of the model.
        generator: torch.Generator | None = None,  # Source of the random init (None: global RNG).
        **model_kwargs,                            # Keyword arguments of the model.
    ):  # fmt: skip
        precond_kwargs = dict(beta_d=beta_d, beta_min=beta_min, M=M, epsilon_t=epsilon_t)
        super().__init__(
            img_resolution,
            img_channels,
            label_dim,
            use_fp16,
            model_type,
            precond_kwargs,
            model_kwargs,
            generator,
        )
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # float32 on the CPU as in EDM (also when built under a meta/cuda device context).
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, device="cpu")))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, device="cpu")))

    def sigma(self, t) -> torch.Tensor:
        """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
        t = t if isinstance(t, torch.Tensor) else torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t**2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma) -> torch.Tensor:
        """t(sigma), the inverse of :meth:`sigma`."""
        sigma = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma)
        return (
            (self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min
        ) / self.beta_d

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` (any shape)."""
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (Song et al.'s VE SDE, EDM Table 1)."""

    def __init__(
        self,
        img_resolution: int,                       # Image resolution.
        img_channels: int,                         # Number of color channels.
        label_dim: int = 0,                        # Number of class labels, 0 = unconditional.
        use_fp16: bool = False,                    # Run the model in float16 (CUDA only)?
        sigma_min: float = 0.02,                   # Smallest supported noise level.
        sigma_max: float = 100,                    # Largest supported noise level.
        model_type: str = "SongUNet",              # Class name of the model.
        generator: torch.Generator | None = None,  # Source of the random init (None: global RNG).
        **model_kwargs,                            # Keyword arguments of the model.
    ):  # fmt: skip
        precond_kwargs = dict(sigma_min=sigma_min, sigma_max=sigma_max)
        super().__init__(
            img_resolution,
            img_channels,
            label_dim,
            use_fp16,
            model_type,
            precond_kwargs,
            model_kwargs,
            generator,
        )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` (any shape)."""
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


class EDMPrecond(_Precond):
    """EDM's preconditioning (Karras et al. 2022, Table 1) with data standard deviation sigma_data."""

    def __init__(
        self,
        img_resolution: int,                       # Image resolution.
        img_channels: int,                         # Number of color channels.
        label_dim: int = 0,                        # Number of class labels, 0 = unconditional.
        use_fp16: bool = False,                    # Run the model in float16 (CUDA only)?
        sigma_min: float = 0,                      # Smallest supported noise level.
        sigma_max: float = float("inf"),           # Largest supported noise level.
        sigma_data: float = 0.5,                   # Expected standard deviation of the data.
        model_type: str = "DhariwalUNet",          # Class name of the model.
        generator: torch.Generator | None = None,  # Source of the random init (None: global RNG).
        **model_kwargs,                            # Keyword arguments of the model.
    ):  # fmt: skip
        precond_kwargs = dict(sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data)
        super().__init__(
            img_resolution,
            img_channels,
            label_dim,
            use_fp16,
            model_type,
            precond_kwargs,
            model_kwargs,
            generator,
        )
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for noise levels ``sigma`` (any shape)."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


PRECONDS: dict[str, type[_Precond]] = {"vp": VPPrecond, "ve": VEPrecond, "edm": EDMPrecond}


def _song_preset(
    embedding_type: str, encoder_type: str, channel_mult_noise: int, resample_filter: list
) -> dict:
    """EDM's DDPM++ (positional, standard) or NCSN++ (fourier, residual) preset for CIFAR-10."""
    return dict(
        model_type="SongUNet",
        embedding_type=embedding_type,
        encoder_type=encoder_type,
        decoder_type="standard",
        channel_mult_noise=channel_mult_noise,
        resample_filter=resample_filter,
        model_channels=128,
        channel_mult=[2, 2, 2],
        num_blocks=4,
        attn_resolutions=[16],
        dropout=0.13,
        augment_dim=9,
    )


# Presets of EDM's train.py (CIFAR-10 defaults: dropout 0.13, augment p 0.12 -> augment_dim 9).
ARCHS: dict[str, dict] = {
    "ddpmpp": _song_preset("positional", "standard", 1, [1, 1]),
    "ncsnpp": _song_preset("fourier", "residual", 2, [1, 3, 3, 1]),
    "adm": dict(
        model_type="DhariwalUNet",
        model_channels=192,
        channel_mult=[1, 2, 3, 4],
        num_blocks=3,
        attn_resolutions=[32, 16, 8],
        dropout=0.13,
        augment_dim=9,
    ),
    "mlp": dict(model_type="MLP", hidden_dim=256, num_layers=4, emb_dim=128, dropout=0.0, augment_dim=0),
}


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def network_kwargs(
    arch: str,
    precond: str,
    img_resolution: int,
    img_channels: int,
    label_dim: int = 0,
    **overrides,
) -> dict:
    """Config of a preset network: ``{"class_name": "VPPrecond", "init_kwargs": {...}}`` (JSON-friendly).

    ``arch`` in ARCHS ('ddpmpp', 'ncsnpp', 'adm', 'mlp'), ``precond`` in PRECONDS ('vp', 've', 'edm');
    ``overrides`` replace preset entries (model or preconditioner arguments, e.g. model_channels=64).
    """
    if arch not in ARCHS:
        raise ValueError(f"network_kwargs: unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    if precond not in PRECONDS:
        raise ValueError(f"network_kwargs: unknown precond {precond!r}; expected one of {sorted(PRECONDS)}")
    init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim)
    init_kwargs.update(copy.deepcopy(ARCHS[arch]))
    init_kwargs.update(overrides)
    return {"class_name": PRECONDS[precond].__name__, "init_kwargs": _jsonable(init_kwargs)}


def build_network(
    config: dict,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.nn.Module:
    """Build the preconditioned network described by ``{"class_name", "init_kwargs"}``.

    ``class_name`` may carry EDM's module prefix ('training.networks.VPPrecond'). Weights are drawn
    from ``generator`` (the network is built on its device; None: global RNG, CPU), then moved to ``device``.
    """
    if not isinstance(config, dict) or "class_name" not in config:
        raise ValueError(
            f"build_network: expected a dict with 'class_name' and 'init_kwargs', got {config!r}"
        )
    name = str(config["class_name"]).rsplit(".", 1)[-1]
    classes = {cls.__name__: cls for cls in PRECONDS.values()}
    if name not in classes:
        raise ValueError(
            f"build_network: unknown class_name {config['class_name']!r}; expected one of {sorted(classes)}"
        )
    net = classes[name](**copy.deepcopy(config.get("init_kwargs", {})), generator=generator)
    return net.to(device) if device is not None else net


def make_network(
    arch: str,
    precond: str,
    img_resolution: int,
    img_channels: int,
    label_dim: int = 0,
    *,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    **overrides,
) -> torch.nn.Module:
    """A preset preconditioned network (see :func:`network_kwargs`), initialised from ``generator``."""
    config = network_kwargs(arch, precond, img_resolution, img_channels, label_dim, **overrides)
    return build_network(config, device=device, generator=generator)
