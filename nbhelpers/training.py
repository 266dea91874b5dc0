"""Training loop for denoisers with EDM's recipe: loss, Adam with lr ramp-up, EMA with ramp-up.

One loop trains image networks (``make_network``) and any other trainable denoiser (e.g.
``molrg.LowRankDenoiser``) on an in-memory data set that lives on the device. It supports gradient
accumulation, bf16/fp16 autocast, ``torch.compile``, DDP under ``torchrun``, snapshots, state dumps
and exact resume.

Randomness is counter-based: each draw is seeded from (seed, purpose, step, ...), never from the
global RNG and never carried over from an earlier step:

- initial weights (when ``train`` builds the network): a CPU generator seeded by (seed, init).
- data order: epoch shuffles. The stream of training indices is the concatenation of permutations
  ``randperm(N)`` seeded by (seed, epoch); step ``s`` takes positions ``[s*B, (s+1)*B)``. Every image
  is seen once per epoch.
- loss: one generator seeded by (seed, step) draws sigma, augmentation and noise for the whole
  global batch; each process and accumulation round evaluates its slice. The draws therefore do not
  depend on ``batch_gpu`` or the number of processes.
- dropout inside the network uses the global RNG (as in EDM); the loop seeds it from
  (seed, step, global round index) inside ``torch.random.fork_rng`` right before each forward pass,
  so the caller's global RNG state is left untouched. With dropout, results depend on batch_gpu.

A state dump then needs only the weights, the optimizer state and the step count to continue
bit-identically (on the CPU; on CUDA as far as the kernels are deterministic); it stores the
seed and batch size to check. The non-finite-loss check runs every step on a single CPU process,
otherwise at log lines and before every save, so nothing is saved after a divergence.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from nbhelpers import safeload
from nbhelpers.atomic import atomic_path, atomic_write_text, remove_stale_tmp
from nbhelpers.augment import AugmentPipe, make_augment_pipe
from nbhelpers.checkpoints import save_network
from nbhelpers.data import model_space
from nbhelpers.devices import default_device
from nbhelpers.losses import LOSSES, DenoisingLoss, LossDraws, make_loss
from nbhelpers.networks import make_network

__all__ = [
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "train",
    "init_distributed",
    "learning_rate",
    "edm_ema_beta",
    "load_training_state",
    "find_latest_state",
    "snapshot_path",
    "state_dump_path",
    "data_fingerprint",
    "RESUME_FREE_OPTIONS",
]

STATE_FORMAT = "nbhelpers.training-state"
STATE_VERSION = 1
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Purposes that seeds are derived for; part of the on-disk contract of exact resume.
_INIT, _DATA, _LOSS, _DROPOUT = 1, 2, 3, 4
_MASK64 = (1 << 64) - 1


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; nothing after the last good save was written."""

    def __init__(self, message: str, step: int, last_snapshot: Path | None, last_state_dump: Path | None):
        super().__init__(message)
        self.step = step  # Optimizer step at which the non-finite loss was detected.
        self.last_snapshot = last_snapshot  # Last snapshot written by this run, if any.
        self.last_state_dump = last_state_dump  # Last state dump written by this run, if any.


@dataclass
class TrainConfig:
    """Everything that defines a training run; JSON-serialisable via ``to_dict``/``from_dict``.

    Defaults follow EDM's ``train.py`` for CIFAR-10 where it has one. Give exactly one of
    ``duration_kimg`` and ``total_steps``, at most one of each ``*_kimg``/``*_steps`` pair.
    """

    arch: str = "ddpmpp"  # make_network preset: 'ddpmpp', 'ncsnpp', 'adm', 'mlp'.
    precond: str = "edm"  # Preconditioning: 'vp', 've', 'edm'.
    loss: str | None = None  # Loss: 'vp', 've', 'edm'; None = same as precond.
    loss_kwargs: dict = field(default_factory=dict)  # Loss constructor overrides (EDM: P_mean, P_std).
    network: dict = field(default_factory=dict)  # Extra make_network arguments (model_channels, ...).
    img_resolution: int | None = None  # None = from the data.
    img_channels: int | None = None  # None = from the data.
    label_dim: int | None = None  # Class-label width; None = from the labels (0 without labels).
    batch_size: int = 512  # Images per optimizer step, all processes together.
    batch_gpu: int | None = None  # Images per forward pass per process; None = batch_size / world size.
    duration_kimg: float | None = None  # Training length in thousands of images ...
    total_steps: int | None = None  # ... or in optimizer steps.
    lr: float = 1e-3  # Learning rate after the ramp-up.
    optimizer: str = "adam"  # 'adam' (betas, eps) or 'sgd' (plain, as trainMoLRG.py --optimizer sgd).
    loss_scaling: float = 1.0  # The summed loss is multiplied by this before backward (EDM's --ls).
    lr_rampup_kimg: float = 10000.0  # Linear learning-rate ramp-up, kimg; 0 = none.
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas.
    eps: float = 1e-8  # Adam epsilon.
    ema_halflife_kimg: float | None = 500.0  # EMA half-life, kimg (used when ema_beta is None).
    ema_rampup_ratio: float | None = 0.05  # EMA half-life ramp-up ratio; None = no ramp-up.
    ema_beta: float | None = None  # Fixed per-step EMA decay (e.g. 0.999); overrides the half-life.
    dropout: float | None = None  # Network dropout; None = the preset's value.
    augment_p: float = 0.0  # Augmentation probability (EDM CIFAR-10: 0.12); 0 = no augmentation.
    augment_kwargs: dict = field(default_factory=dict)  # Overrides of EDM's augmentation set.
    seed: int = 0  # Seed of every random draw (init, data order, noise, dropout).
    snapshot_kimg: float | None = None  # Save an EMA snapshot every this many kimg ...
    snapshot_steps: int | None = None  # ... or steps; the final snapshot is always saved.
    state_dump_kimg: float | None = None  # Save the full training state every this many kimg ...
    state_dump_steps: int | None = None  # ... or steps (also at the end when enabled).
    log_every: int = 100  # Steps between log lines (stats.jsonl, history, progress bar).
    grad_clip: float | None = None  # Max gradient norm; None = no clipping.
    precision: str = "fp32"  # 'fp32', 'bf16' or 'fp16' autocast; weights and optimizer stay fp32.
    compile: bool = False  # Run the network under torch.compile.
    num_threads: int | None = None  # torch.set_num_threads for this process; None = leave as is.

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        self.network = dict(self.network)
        self.augment_kwargs = dict(self.augment_kwargs)
        self.loss_kwargs = dict(self.loss_kwargs)
        errors = []
        if self.precond not in ("vp", "ve", "edm"):
            errors.append(f"precond must be 'vp', 've' or 'edm', got {self.precond!r}")
        if self.loss is not None and self.loss not in LOSSES:
            errors.append(f"loss must be one of {sorted(LOSSES)} or None, got {self.loss!r}")
        elif self.loss_kwargs:
            try:
                make_loss(self.loss_name, **self.loss_kwargs)
            except (TypeError, ValueError) as e:
                errors.append(f"loss_kwargs {self.loss_kwargs} do not fit the {self.loss_name} loss: {e}")
        if (self.duration_kimg is None) == (self.total_steps is None):
            errors.append("give exactly one of duration_kimg and total_steps")
        if self.duration_kimg is not None and not self.duration_kimg > 0:
            errors.append(f"duration_kimg must be positive, got {self.duration_kimg}")
        if self.total_steps is not None and self.total_steps < 1:
            errors.append(f"total_steps must be at least 1, got {self.total_steps}")
        for a, b in [("snapshot_kimg", "snapshot_steps"), ("state_dump_kimg", "state_dump_steps")]:
            va, vb = getattr(self, a), getattr(self, b)
            if va is not None and vb is not None:
                errors.append(f"give at most one of {a} and {b}")
            if (va is not None and not va > 0) or (vb is not None and vb < 1):
                errors.append(f"{a}/{b} must be positive")
        if self.batch_size < 1 or (self.batch_gpu is not None and self.batch_gpu < 1):
            errors.append("batch_size and batch_gpu must be positive")
        if self.ema_beta is not None and not 0 <= self.ema_beta < 1:
            errors.append(f"ema_beta must be in [0, 1), got {self.ema_beta}")
        if self.ema_beta is None and (self.ema_halflife_kimg is None or self.ema_halflife_kimg < 0):
            errors.append("give ema_beta or a non-negative ema_halflife_kimg")
        if self.optimizer not in ("adam", "sgd"):
            errors.append(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not self.loss_scaling > 0:
            errors.append(f"loss_scaling must be positive, got {self.loss_scaling}")
        if self.precision not in PRECISIONS:
            errors.append(f"precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}")
        if not 0 <= self.augment_p <= 1:
            errors.append(f"augment_p must be in [0, 1], got {self.augment_p}")
        if self.log_every < 1:
            errors.append(f"log_every must be at least 1, got {self.log_every}")
        if errors:
            raise ValueError("TrainConfig: " + "; ".join(errors))

    @property
    def loss_name(self) -> str:
        """The loss this config trains with: ``loss``, else the one of its ``precond``."""
        return self.loss or self.precond

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict of all fields."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return json.loads(json.dumps(d))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig.from_dict: unknown keys {unknown}")
        return cls(**d)

    def num_steps(self) -> int:
        """Number of optimizer steps of the run (``duration_kimg`` rounded up to whole batches)."""
        if self.total_steps is not None:
            return int(self.total_steps)
        return max(1, math.ceil(self.duration_kimg * 1000 / self.batch_size))


@dataclass
class TrainResult:
    """Outcome of ``train``: the trained network, its EMA, the log lines and the progress reached."""

    net: torch.nn.Module  # Trained weights (unwrapped from DDP/compile), in train mode.
    ema: torch.nn.Module  # EMA weights, in eval mode; what snapshots hold.
    history: list[dict]  # One dict per log line: step, kimg, loss, lr, images_per_sec, time_s.
    steps: int  # Optimizer steps done.
    kimg: float  # Thousands of training images seen.


# ----------------------------------------------------------------------------
# Schedules.


def learning_rate(base_lr: float, cur_nimg: int, rampup_kimg: float) -> float:
    """EDM's linear ramp-up: ``base_lr * min(cur_nimg / (rampup_kimg * 1000), 1)``, else ``base_lr``."""
    if rampup_kimg <= 0:
        return base_lr
    return base_lr * min(cur_nimg / (rampup_kimg * 1000), 1.0)


def edm_ema_beta(batch_size: int, cur_nimg: int, halflife_kimg: float, rampup_ratio: float | None) -> float:
    """EDM's per-step EMA decay: half-life ``min(halflife_kimg*1000, cur_nimg*rampup_ratio)`` images."""
    halflife_nimg = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * rampup_ratio)
    return 0.5 ** (batch_size / max(halflife_nimg, 1e-8))


# ----------------------------------------------------------------------------
# Seeds and data order.


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers with SplitMix64 (stable across runs and platforms)."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


class _EpochOrder:
    """Infinite stream of data indices made of seeded per-epoch permutations, on ``device``."""

    def __init__(self, n: int, seed: int, device: torch.device):
        self.n, self.seed, self.device = n, seed, device
        self.generator = torch.Generator(device=device)
        self.cache: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self.cache:
            self.generator.manual_seed(_derive_seed(self.seed, _DATA, epoch))
            self.cache[epoch] = torch.randperm(self.n, generator=self.generator, device=self.device)
        return self.cache[epoch]

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Indices at stream positions ``[start, start + count)``, shape (count,), int64."""
        e0, e1 = start // self.n, (start + count - 1) // self.n
        for e in [e for e in self.cache if e < e0]:
            del self.cache[e]
        perms = torch.cat([self._perm(e) for e in range(e0, e1 + 1)])
        offset = start - e0 * self.n
        return perms[offset : offset + count]


@contextlib.contextmanager
def _seeded_global_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG of ``device`` (for dropout) and restore the caller's state afterwards."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with torch.random.fork_rng(devices=[index], device_type="cuda"), torch.cuda.device(index):
            torch.default_generator.manual_seed(seed)
            torch.cuda.manual_seed(seed)
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            yield


# ----------------------------------------------------------------------------
# Distributed helpers.


def init_distributed(device: torch.device | str | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; returns (rank, world_size).

    Uses NCCL (and selects GPU ``LOCAL_RANK``) when ``device`` is CUDA, or is None and CUDA is
    available; gloo otherwise. A process without torchrun variables gets (0, 1) and no group.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if default_device(device).type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")
    return dist.get_rank(), dist.get_world_size()


def _join_processes(device: torch.device | str | None, num_threads: int | None):
    """(rank, world_size, device) of this process (``init_distributed``), with ``num_threads`` set."""
    rank, world_size = init_distributed(device)
    device = _resolve_device(device, world_size > 1)
    if num_threads:
        torch.set_num_threads(num_threads)
    return rank, world_size, device


def _resolve_device(device: torch.device | str | None, distributed: bool) -> torch.device:
    dev = default_device(device)
    if dev.type == "cuda" and dev.index is None:
        index = int(os.environ.get("LOCAL_RANK", "0")) if distributed else torch.cuda.current_device()
        dev = torch.device("cuda", index)
    return dev


# ----------------------------------------------------------------------------
# Files.


def snapshot_path(outdir: str | os.PathLike, nimg: int) -> Path:
    """Path of the EMA snapshot taken after ``nimg`` training images: named by the exact image count
    (10 digits, sortable), so snapshots of distinct steps never share a name."""
    if int(nimg) < 0:
        raise ValueError(f"nimg must be non-negative, got {nimg}")
    return Path(outdir) / f"network-snapshot-{int(nimg):010d}.nbh"


def state_dump_path(outdir: str | os.PathLike, step: int) -> Path:
    """Path of the training-state dump taken after ``step`` optimizer steps."""
    return Path(outdir) / f"training-state-{step:09d}.pt"


def find_latest_state(outdir: str | os.PathLike) -> Path | None:
    """The state dump with the most steps in ``outdir``, or None."""
    outdir = Path(outdir)
    if not outdir.is_dir():
        return None
    found = [
        (int(m.group(1)), p)
        for p in outdir.iterdir()
        if (m := re.fullmatch(r"training-state-(\d+)\.pt", p.name))
    ]
    return max(found)[1] if found else None


def load_training_state(path: str | os.PathLike) -> dict[str, Any]:
    """Read a state dump with :func:`safeload.read_torch_file`: tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training state {path} does not exist")
    try:
        state = safeload.read_torch_file(path)
    except safeload.PickleError as e:
        raise ValueError(f"training state {e}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not an nbhelpers training state (format tag missing)")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path}: unsupported training-state version {state.get('version')}")
    kinds = dict(step=int, window_steps=int, net=dict, ema=dict, optimizer=dict, config=dict, history=list)
    kinds["window_loss"] = torch.Tensor
    bad = [k for k, kind in kinds.items() if not isinstance(state.get(k), kind)]
    if bad:
        raise ValueError(f"{path}: training state is missing or has malformed entries {bad}")
    return state


# Options that may differ on resume without changing what the run computes up to where it stopped.
RESUME_FREE_OPTIONS = frozenset(
    {
        "duration_kimg",
        "total_steps",
        "snapshot_kimg",
        "snapshot_steps",
        "state_dump_kimg",
        "state_dump_steps",
        "log_every",
        "compile",
        "num_threads",
        "batch_gpu",
    }
)


def data_fingerprint(images: torch.Tensor, labels: torch.Tensor | None) -> str:
    """SHA-256 of the training data (images and labels as stored), to tell data sets apart on resume."""
    h = hashlib.sha256()
    for t in (images, labels):
        if t is not None:
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _check_resume(
    path: Path, state: dict, config: TrainConfig, fingerprint: str, data_shape: list, allow_changed
) -> None:
    """Refuse a resume whose data or result-changing options differ from the saved run's, unless
    each difference is named in ``allow_changed``."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(allow_changed) - fields - {"data"})
    if unknown:
        raise ValueError(f"allow_changed: unknown option(s) {unknown}; expected 'data' or TrainConfig fields")
    saved, now = state.get("config") or {}, config.to_dict()
    changed = {
        k: (saved.get(k), now.get(k))
        for k in sorted(fields - RESUME_FREE_OPTIONS)
        if saved.get(k) != now.get(k)
    }
    saved_shape = list(state.get("data_shape") or [])
    if state.get("data_sha256", fingerprint) != fingerprint or saved_shape != list(data_shape):
        changed["data"] = (f"data of shape {saved_shape}", f"other data of shape {list(data_shape)}")
    refused = {k: v for k, v in changed.items() if k not in allow_changed}
    if refused:
        what = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ValueError(
            f"{path}: this run differs from the saved one ({what}); resume only the same run, or allow "
            f"the change explicitly (allow_changed={sorted(refused)}; "
            f"CLI: --allow-changed {','.join(refused)})"
        )


def _save_snapshot(ema: torch.nn.Module, path: Path) -> bool:
    """Save the EMA network with checkpoints.save_network; warn and return False if it cannot."""
    try:
        save_network(ema, path)
    except ValueError as e:
        warnings.warn(
            f"no network snapshots for this run ({e}); state dumps still hold the EMA", stacklevel=3
        )
        return False
    return True


# ----------------------------------------------------------------------------
# Setup.


def _prepare_data(
    data: torch.Tensor | tuple, label_dim: int | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Images (N,C,H,W) on ``device`` (uint8 kept as uint8, floats as float32) and one-hot labels or None."""
    if isinstance(data, tuple | list):
        if len(data) != 2:
            raise ValueError(f"data must be images or (images, labels), got a sequence of {len(data)}")
        images, labels = data
    else:
        images, labels = data, None
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"training images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] < 1:
        raise ValueError("training data is empty")
    if images.dtype == torch.uint8:
        images = images.to(device)
    elif images.is_floating_point():
        images = images.to(device=device, dtype=torch.float32)
    else:
        raise ValueError(f"training images must be uint8 or floating point, got {images.dtype}")
    if labels is None:
        if label_dim:
            raise ValueError(f"label_dim={label_dim} but no labels were given")
        return images, None
    labels = torch.as_tensor(labels, device=device)
    if labels.shape[0] != images.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {images.shape[0]} images")
    if labels.ndim == 1 and not labels.is_floating_point():
        if labels.numel() and int(labels.min()) < 0:
            raise ValueError(f"class labels must be non-negative, got {int(labels.min())}")
        if label_dim is not None and labels.numel() and int(labels.max()) >= label_dim:
            raise ValueError(f"class label {int(labels.max())} is out of range for label_dim={label_dim}")
        dim = label_dim if label_dim is not None else int(labels.max()) + 1
        labels = F.one_hot(labels.long(), dim)
    elif labels.ndim != 2:
        raise ValueError(f"labels must be (N,) class indices or (N, label_dim), got {tuple(labels.shape)}")
    if label_dim is not None and labels.shape[1] != label_dim:
        raise ValueError(f"labels have width {labels.shape[1]} but label_dim={label_dim}")
    return images, labels.to(torch.float32)


def _build_network(config: TrainConfig, augment_pipe: AugmentPipe | None) -> torch.nn.Module:
    overrides = dict(config.network)
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    overrides.setdefault("augment_dim", augment_pipe.label_dim if augment_pipe is not None else 0)
    generator = torch.Generator().manual_seed(_derive_seed(config.seed, _INIT))
    return make_network(
        config.arch,
        config.precond,
        config.img_resolution,
        config.img_channels,
        config.label_dim,
        generator=generator,
        **overrides,
    )


def _make_optimizer(net: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in net.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, foreach=True)
    kwargs: dict[str, Any] = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas, eps=config.eps, **kwargs)


# ----------------------------------------------------------------------------
# Pieces of the loop, each usable alone.


@dataclass
class _Layout:
    """How one global batch of ``batch`` images is split over processes and accumulation rounds."""

    batch: int  # Images per optimizer step, all processes together.
    rank: int  # This process.
    world_size: int  # Processes.
    batch_gpu: int  # Images per forward pass.
    rounds: int  # Forward/backward passes per optimizer step on each process.

    @property
    def batch_local(self) -> int:
        """Images per optimizer step on this process."""
        return self.batch // self.world_size

    def round_slice(self, r: int) -> slice:
        """Positions in the global batch that round ``r`` of this process evaluates."""
        lo = self.rank * self.batch_local + r * self.batch_gpu
        return slice(lo, lo + self.batch_gpu)


def _batch_layout(config: TrainConfig, rank: int, world_size: int) -> _Layout:
    """Split ``config.batch_size`` over ``world_size`` processes in rounds of at most ``batch_gpu``."""
    B = config.batch_size
    if B % world_size:
        raise ValueError(f"batch_size {B} is not divisible by the world size {world_size}")
    batch_local = B // world_size
    batch_gpu = min(config.batch_gpu or batch_local, batch_local)
    if batch_local % batch_gpu:
        raise ValueError(f"batch_size/world_size = {batch_local} is not a multiple of batch_gpu {batch_gpu}")
    return _Layout(B, rank, world_size, batch_gpu, batch_local // batch_gpu)


def _complete_config(config: TrainConfig, images: torch.Tensor, labels: torch.Tensor | None) -> TrainConfig:
    """``config`` with resolution, channels and label width taken from the data (given ones must match)."""
    _, C, H, W = images.shape
    if H != W:
        raise ValueError(f"training images must be square, got {H}x{W}")
    for name, value in [("img_resolution", H), ("img_channels", C)]:
        if getattr(config, name) not in (None, value):
            raise ValueError(f"config.{name}={getattr(config, name)} but the data has {value}")
    label_dim = 0 if labels is None else labels.shape[1]
    return dataclasses.replace(config, img_resolution=H, img_channels=C, label_dim=label_dim)


@dataclass
class _Model:
    """What an optimizer step changes or uses: the network, its EMA, optimizer, loss and augmentation."""

    net: torch.nn.Module
    ema: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None  # fp16 only.
    loss_fn: DenoisingLoss
    augment_pipe: AugmentPipe | None
    amp_dtype: torch.dtype | None  # Autocast dtype; None = fp32.


def _setup_model(config: TrainConfig, net: torch.nn.Module | None, device: torch.device) -> _Model:
    """The network (built from ``config`` unless given) in train mode on ``device``, an EMA copy, the
    optimizer, the loss and the augmentation pipe of a complete ``config``."""
    augment_pipe = make_augment_pipe(config.augment_p, **config.augment_kwargs)
    loss_fn = make_loss(config.loss_name, **config.loss_kwargs)
    if net is None:
        net = _build_network(config, augment_pipe)
    for name in ("img_resolution", "img_channels"):
        value = getattr(config, name)
        if getattr(net, name, value) != value:
            raise ValueError(f"net.{name}={getattr(net, name)} does not match the data ({value})")
    net.train().requires_grad_(True).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = _make_optimizer(net, config, device)
    scaler = torch.amp.GradScaler(device.type) if config.precision == "fp16" else None
    return _Model(net, ema, optimizer, scaler, loss_fn, augment_pipe, PRECISIONS[config.precision])


@dataclass
class _Progress:
    """Where the run stands: steps done, log lines, and the loss window since the last log line."""

    step: int
    history: list[dict]
    window_loss: torch.Tensor  # Sum over the window's steps of each step's mean loss, float32 0-d.
    window_steps: int


def _resume_source(resume: str | os.PathLike | None, outdir: Path | None) -> str | os.PathLike | None:
    """The state dump that ``resume`` names ('latest'/'auto': the newest one in ``outdir``), or None."""
    if resume not in ("latest", "auto"):
        return resume
    if outdir is None:
        raise ValueError(f"resume={resume!r} needs an outdir")
    found = find_latest_state(outdir)
    if found is None and resume == "latest":
        raise FileNotFoundError(f"no training-state-*.pt in {outdir} to resume from")
    return found


def _restore(m: _Model, resume: str | os.PathLike | None, device: torch.device, **expected: Any) -> _Progress:
    """Load the state dump ``resume`` into ``m``, or a fresh start if None.

    ``expected``: the ``config``, data ``fingerprint``, ``data_shape`` and ``allow_changed`` of this
    run, which ``_check_resume`` compares with the saved run's first.
    """
    if resume is None:
        return _Progress(0, [], torch.zeros(()).to(device=device, dtype=torch.float32), 0)
    state = load_training_state(resume)
    _check_resume(Path(resume), state, **expected)
    try:
        m.net.load_state_dict(state["net"])
        m.ema.load_state_dict(state["ema"])
        m.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{resume}: state does not fit this network/optimizer: {e}") from e
    if m.scaler is not None and state.get("scaler"):
        m.scaler.load_state_dict(state["scaler"])
    window_loss = state["window_loss"].to(device=device, dtype=torch.float32)
    return _Progress(int(state["step"]), list(state["history"]), window_loss, int(state["window_steps"]))


def _wrap(
    net: torch.nn.Module, config: TrainConfig, world_size: int, device: torch.device
) -> tuple[torch.nn.Module, Any]:
    """(model to call, the DDP wrapper or None): ``net`` under DDP with several processes and under
    ``torch.compile`` if asked."""
    ddp = None
    model: torch.nn.Module = net
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids)
    if config.compile:
        model = torch.compile(model)
    return model, ddp


class _Batch(NamedTuple):
    """One global batch: the training data, the positions it takes, and the loss's random draws."""

    images: torch.Tensor  # All training images (N, C, H, W), uint8 or float32.
    labels: torch.Tensor | None  # All labels (N, label_dim), or None.
    indices: torch.Tensor  # (batch_size,) positions into images.
    draws: LossDraws  # Sigma, noise and augmentation of the batch_size samples.


def _accumulate_gradients(
    model: Callable, m: _Model, config: TrainConfig, layout: _Layout, batch: _Batch, step: int, ddp
) -> list[torch.Tensor]:
    """Forward and backward passes over this process's rounds of one global batch, leaving in
    ``m.net`` the gradient of the batch's summed loss divided by the local batch size.

    Returns each round's mean loss (0-d, detached). Dropout draws from the global RNG seeded by
    (seed, step, global round index).
    """
    device = batch.images.device
    losses = []
    m.optimizer.zero_grad(set_to_none=True)
    for r in range(layout.rounds):
        sl = layout.round_slice(r)
        x = batch.images[batch.indices[sl]]
        x = model_space(x)
        y = batch.labels[batch.indices[sl]] if batch.labels is not None else None
        no_sync = ddp.no_sync() if (ddp is not None and r < layout.rounds - 1) else contextlib.nullcontext()
        dropout_seed = _derive_seed(config.seed, _DROPOUT, step, layout.rank * layout.rounds + r)
        with no_sync, _seeded_global_rng(dropout_seed, device):
            with torch.autocast(device.type, dtype=m.amp_dtype, enabled=m.amp_dtype is not None):
                loss = m.loss_fn.evaluate(model, x, y, batch.draws[sl], m.augment_pipe)
            scaled = loss.sum() / layout.batch_local
            if config.loss_scaling != 1:
                scaled = scaled * config.loss_scaling
            (m.scaler.scale(scaled) if m.scaler is not None else scaled).backward()
        losses.append(loss.detach().mean())
    return losses


def _set_learning_rate(optimizer: torch.optim.Optimizer, config: TrainConfig, cur_nimg: int) -> float:
    """Set and return the learning rate of the step that starts at ``cur_nimg`` images (ramp-up)."""
    lr = learning_rate(config.lr, cur_nimg, config.lr_rampup_kimg)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _update_weights(m: _Model, grad_clip: float | None) -> None:
    """One optimizer step on the accumulated gradients (clipped to norm ``grad_clip`` if given)."""
    if grad_clip is not None:
        if m.scaler is not None:
            m.scaler.unscale_(m.optimizer)
        torch.nn.utils.clip_grad_norm_(list(m.net.parameters()), grad_clip)
    if m.scaler is not None:
        m.scaler.step(m.optimizer)
        m.scaler.update()
    else:
        m.optimizer.step()


def _update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """``ema <- beta * ema + (1 - beta) * net`` for the parameters; buffers are copied."""
    with torch.no_grad():
        torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - beta)
        ema_buffers = list(ema.buffers())
        if ema_buffers:
            torch._foreach_copy_(ema_buffers, list(net.buffers()))


def _ema_beta(config: TrainConfig, cur_nimg: int) -> float:
    """The EMA decay of the step that starts at ``cur_nimg`` images (as EDM: before the step)."""
    if config.ema_beta is not None:
        return config.ema_beta
    return edm_ema_beta(config.batch_size, cur_nimg, config.ema_halflife_kimg, config.ema_rampup_ratio)


def _due(prev_nimg: int, cur_nimg: int, step: int, every_kimg: float | None, every_steps: int | None) -> bool:
    """Whether a periodic save falls due at ``step`` (``every_steps``) or on crossing a multiple of
    ``every_kimg`` between ``prev_nimg`` and ``cur_nimg`` images."""
    if every_steps is not None:
        return step % every_steps == 0
    if every_kimg is not None:
        every = every_kimg * 1000
        return math.floor(cur_nimg / every) > math.floor(prev_nimg / every)
    return False


def _saves_due(config: TrainConfig, step: int, done: bool) -> tuple[bool, bool]:
    """(snapshot, state dump): whether each falls due after ``step``; both at the end (dumps if enabled)."""
    prev_nimg, cur_nimg = (step - 1) * config.batch_size, step * config.batch_size
    snap = done or _due(prev_nimg, cur_nimg, step, config.snapshot_kimg, config.snapshot_steps)
    dumps_on = config.state_dump_kimg is not None or config.state_dump_steps is not None
    dump = (done and dumps_on) or _due(
        prev_nimg, cur_nimg, step, config.state_dump_kimg, config.state_dump_steps
    )
    return snap, dump


def _window_mean(progress: _Progress, world_size: int) -> float:
    """Mean loss per step over the window, averaged over processes (a collective call)."""
    value = progress.window_loss.clone()
    if world_size > 1:
        dist.all_reduce(value)
        value /= world_size
    return value.item() / max(progress.window_steps, 1)


class _Outputs:
    """The files of a run in ``outdir`` (on the main process), the progress bar, and what was saved."""

    def __init__(self, outdir: Path | None, config: TrainConfig, progress: _Progress, bar: bool, total: int):
        self.outdir, self.stats_file, self.bar = outdir, None, None
        self.last_snapshot: Path | None = None
        self.last_dump: Path | None = None
        self.snapshots_ok = True
        if outdir is not None:
            outdir.mkdir(parents=True, exist_ok=True)
            remove_stale_tmp(outdir)
            atomic_write_text(outdir / "training_options.json", json.dumps(config.to_dict(), indent=2) + "\n")
            lines = "".join(json.dumps(h) + "\n" for h in progress.history)
            atomic_write_text(outdir / "stats.jsonl", lines)
            self.stats_file = open(outdir / "stats.jsonl", "a")
        if bar:
            self.bar = tqdm(
                total=total, initial=progress.step, unit="step", mininterval=0.5, dynamic_ncols=True
            )
        self.window_start = self.t0 = time.perf_counter()

    def check_finite(self, value: float, step: int, batch: int) -> None:
        """Raise TrainingDivergedError if the loss ``value`` seen by ``step`` is not finite."""
        if not math.isfinite(value):
            raise TrainingDivergedError(
                f"training diverged: loss is {value} by step {step} (kimg {step * batch / 1000:g}); "
                f"last snapshot: {self.last_snapshot}, last state dump: {self.last_dump}",
                step,
                self.last_snapshot,
                self.last_dump,
            )

    def log(self, p: _Progress, lr: float, batch: int, world_size: int) -> None:
        """Close the loss window with a log line: check the loss, append to ``p.history`` and
        stats.jsonl, show it on the progress bar, and start a new window."""
        mean_loss = _window_mean(p, world_size)
        self.check_finite(mean_loss, p.step, batch)
        elapsed = time.perf_counter() - self.window_start
        entry = dict(
            step=p.step,
            kimg=p.step * batch / 1000,
            loss=mean_loss,
            lr=lr,
            images_per_sec=p.window_steps * batch / max(elapsed, 1e-9),
            time_s=time.perf_counter() - self.t0,
        )
        p.history.append(entry)
        if self.stats_file is not None:
            self.stats_file.write(json.dumps(entry) + "\n")
            self.stats_file.flush()
        if self.bar is not None:
            self.bar.set_postfix(
                kimg=f"{entry['kimg']:.1f}",
                loss=f"{mean_loss:.4g}",
                img_s=f"{entry['images_per_sec']:.0f}",
                refresh=False,
            )
        p.window_loss.zero_()
        p.window_steps = 0
        self.window_start = time.perf_counter()

    def save(
        self,
        m: _Model,
        config: TrainConfig,
        p: _Progress,
        world_size: int,
        data: dict,
        snap: bool,
        dump: bool,
    ):
        """The EMA snapshot (if ``snap``) and the state dump (if ``dump``) of the run at ``p.step``."""
        if snap:
            self.snapshot(m.ema, p.step * config.batch_size)
        if dump and self.outdir is not None:
            self.dump(_training_state(m, config, p, world_size, data))

    def snapshot(self, ema: torch.nn.Module, nimg: int) -> None:
        """Save the EMA as ``snapshot_path(outdir, nimg)``; after a failure, no more snapshots."""
        if self.outdir is not None and self.snapshots_ok:
            path = snapshot_path(self.outdir, nimg)
            self.snapshots_ok = _save_snapshot(ema, path)
            self.last_snapshot = path if self.snapshots_ok else self.last_snapshot

    def dump(self, state: dict) -> None:
        """Write the training state ``state`` (see :func:`_training_state`) atomically."""
        if self.outdir is not None:
            path = state_dump_path(self.outdir, state["step"])
            with atomic_path(path) as tmp:
                torch.save(state, tmp)
            self.last_dump = path

    def advance(self) -> None:
        """One step done: move the progress bar."""
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.stats_file is not None:
            self.stats_file.close()


def _training_state(m: _Model, config: TrainConfig, p: _Progress, world_size: int, data: dict) -> dict:
    """Everything a state dump holds to continue the run bit-identically (tensors on the CPU).

    ``data``: the training data's ``data_shape`` and ``data_sha256``, checked on resume."""
    return dict(
        format=STATE_FORMAT,
        version=STATE_VERSION,
        step=p.step,
        nimg=p.step * config.batch_size,
        world_size=world_size,
        **data,
        config=config.to_dict(),
        net={k: v.detach().cpu() for k, v in m.net.state_dict().items()},
        ema={k: v.detach().cpu() for k, v in m.ema.state_dict().items()},
        optimizer=m.optimizer.state_dict(),
        scaler=m.scaler.state_dict() if m.scaler is not None else None,
        history=p.history,
        window_loss=p.window_loss.detach().cpu(),
        window_steps=p.window_steps,
    )


# ----------------------------------------------------------------------------
# The loop.


def train(
    config: TrainConfig,
    data: torch.Tensor | tuple[torch.Tensor, torch.Tensor],  # Images, or (images, labels): see below.
    outdir: str | os.PathLike | None = None,   # training_options.json, stats.jsonl, snapshots, dumps.
    device: torch.device | str | None = None,  # Default: CUDA (LOCAL_RANK under torchrun) if present.
    resume: str | os.PathLike | None = None,   # A state dump, 'latest' (in outdir) or 'auto' (or fresh).
    progress: bool = True,                     # Progress bar on rank 0.
    net: torch.nn.Module | None = None,        # A prebuilt denoiser, e.g. molrg.LowRankDenoiser.
    allow_changed: Sequence[str] = (),         # On resume: 'data' or options that may differ.
) -> TrainResult:  # fmt: skip
    """Train a denoiser on in-memory ``data``; returns the network, its EMA and the log.

    ``data``: (N,C,H,W) float in model space [-1, 1] or uint8 (``data.to_model``), with labels as
    class indices (N,) or one-hot (N, label_dim). On resume the data and the options outside
    ``RESUME_FREE_OPTIONS`` must match the saved run's unless in ``allow_changed``. Under torchrun
    each rank trains its slice of each global batch. Raises TrainingDivergedError on a NaN/inf loss.
    """
    # Processes, device, data and the configuration the data completes.
    rank, world_size, device = _join_processes(device, config.num_threads)
    images, labels = _prepare_data(data, config.label_dim, device)
    config = _complete_config(config, images, labels)
    layout = _batch_layout(config, rank, world_size)
    B, total_steps = config.batch_size, config.num_steps()

    # Model, EMA, optimizer, loss.
    m = _setup_model(config, net, device)

    # Resume: the same data and options as the saved run, unless a change is allowed.
    outdir = Path(outdir) if outdir is not None else None
    resume = _resume_source(resume, outdir)
    fingerprint = data_fingerprint(images, labels) if (outdir is not None or resume is not None) else None
    data_record = dict(data_shape=list(images.shape), data_sha256=fingerprint)
    checks = dict(config=config, fingerprint=fingerprint, allow_changed=allow_changed)
    p = _restore(m, resume, device, data_shape=data_record["data_shape"], **checks)

    # Wrappers, output files, data order and loss generator.
    model, ddp = _wrap(m.net, config, world_size, device)
    out = _Outputs(outdir if rank == 0 else None, config, p, progress and rank == 0, total_steps)
    order = _EpochOrder(images.shape[0], config.seed, device)
    loss_gen = torch.Generator(device=device)

    try:
        while p.step < total_steps:
            cur_nimg = p.step * B
            lr = _set_learning_rate(m.optimizer, config, cur_nimg)

            # Global batch: indices and random draws, identical on every rank.
            loss_gen.manual_seed(_derive_seed(config.seed, _LOSS, p.step))
            draws = m.loss_fn.draw((B, *images.shape[1:]), loss_gen, device, m.augment_pipe)
            batch = _Batch(images, labels, order.indices(cur_nimg, B), draws)

            # Accumulate gradients over this rank's rounds, then update the weights.
            for loss in _accumulate_gradients(model, m, config, layout, batch, p.step, ddp):
                p.window_loss += loss / layout.rounds
            if world_size == 1 and device.type == "cpu":  # cheap there: check the loss at every step
                out.check_finite(p.window_loss.item(), p.step + 1, B)
            _update_weights(m, config.grad_clip)

            # EMA (beta from the image count before this step, as EDM).
            _update_ema(m.ema, m.net, _ema_beta(config, cur_nimg))
            p.step += 1
            p.window_steps += 1
            done = p.step >= total_steps

            # Logging.
            if p.step % config.log_every == 0 or done:
                out.log(p, lr, B, world_size)

            # Snapshots and state dumps (only after a finite-loss check covering every step so far).
            # Decided identically on every rank (the check below is collective), whatever outdir is.
            snap, dump = _saves_due(config, p.step, done)
            if (snap or dump) and p.window_steps:
                out.check_finite(_window_mean(p, world_size), p.step, B)
            out.save(m, config, p, world_size, data_record, snap, dump)
            out.advance()
    finally:
        out.close()

    return TrainResult(net=m.net, ema=m.ema, history=p.history, steps=p.step, kimg=p.step * B / 1000)
