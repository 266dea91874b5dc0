"""Grid-cell plumbing shared by the experiments: data specs, pools and fresh samples, the device,
validated training configs, training, sampling at the evaluation seeds and the stored form of samples.

A *data spec* is a small JSON dict that names a data source; everything a cell needs is derived
from it deterministically, so a spec can be part of a run-store key:

- ``molrg``: a mixture of K low-rank Gaussians (bases from ``seed``), points drawn from seeded streams;
- ``fashion_mnist``: the IDX files of a folder, area-resized to ``resolution``; the train split is
  the pool, the test split the fresh (held-out) samples;
- ``images``: an EDM folder or zip; its first ``pool_size`` images are the pool, the rest fresh.

The training set of size N is always the first N points of the pool, so the sets are nested.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# ----------------------------------------------------------------------------
# Device.


def device() -> torch.device:
    """The device cells run on: CUDA when available, else the CPU (``devices.default_device``)."""
    from ..devices import default_device

    return torch.device(default_device())


# ----------------------------------------------------------------------------
# Panels: a chapter's main data set and its controlled MoLRG counterpart.


def panels(params: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """A notebook's panels, name -> parameters: the main panel and, when ``molrg_panel`` is set, the
    MoLRG panel (the main parameters with those overrides, dataset 'molrg', backend 'relative')."""
    main = dict(params)
    out = {panel_name(main): main}
    if params.get("molrg_panel"):
        molrg = {**main, "dataset": "molrg", **dict(params["molrg_panel"])}
        if molrg["backend"] != "relative":
            raise ValueError("molrg_panel: MoLRG points are vectors, not images; give it backend 'relative'")
        out[panel_name(molrg)] = molrg
    return out


def panel_name(params: Mapping[str, Any]) -> str:
    """Display name of a panel, e.g. 'Fashion-MNIST 8x8' or 'MoLRG n=48, K=8, d=4'."""
    kind, r = params["dataset"], int(params["resolution"])
    if kind == "fashion_mnist":
        return f"Fashion-MNIST {r}x{r}"
    if kind == "molrg":
        n = int(params["channels"]) * r * r
        return f"MoLRG n={n}, K={int(params['molrg_classes'])}, d={int(params['molrg_dim'])}"
    return f"images ({Path(str(params['dataset_path'])).name})"


# ----------------------------------------------------------------------------
# Data specs.


def molrg_spec(
    num_classes: int,
    intrinsic_dim: int,
    resolution: int,
    channels: int,
    seed: int,
    pool_size: int | None = None,
) -> dict[str, Any]:
    """Spec of a MoLRG with K = ``num_classes`` subspaces of dimension d in R^(C R R), bases from ``seed``."""
    spec = {
        "source": "molrg",
        "num_classes": int(num_classes),
        "intrinsic_dim": int(intrinsic_dim),
        "resolution": int(resolution),
        "channels": int(channels),
        "seed": int(seed),
    }
    if pool_size is not None:
        spec["pool_size"] = int(pool_size)
    return spec


def fashion_mnist_spec(
    path: str, resolution: int, channels: int = 1, pool_size: int | None = None
) -> dict[str, Any]:
    """Spec of Fashion-MNIST from the IDX folder ``path`` at ``resolution`` (train split = pool)."""
    spec = {
        "source": "fashion_mnist",
        "path": str(path),
        "resolution": int(resolution),
        "channels": int(channels),
    }
    if pool_size is not None:
        spec["pool_size"] = int(pool_size)
    return spec


def images_spec(path: str, pool_size: int) -> dict[str, Any]:
    """Spec of an EDM image folder/zip whose first ``pool_size`` images are the pool."""
    return {"source": "images", "path": str(path), "pool_size": int(pool_size)}


def data_spec(params: Mapping[str, Any], pool_size: int) -> dict[str, Any]:
    """The spec of a panel's data from notebook parameters: ``dataset`` 'molrg' (``molrg_classes``,
    ``molrg_dim``, ``resolution``, ``channels``, ``data_seed``), 'fashion_mnist' (IDX folder
    ``dataset_path``, default the Debian package's) or 'images' (EDM zip/folder ``dataset_path``)."""
    from ..data import FASHION_MNIST_ROOT

    kind = params["dataset"]
    if kind == "molrg":
        return molrg_spec(
            params["molrg_classes"],
            params["molrg_dim"],
            params["resolution"],
            params["channels"],
            params["data_seed"],
            pool_size=pool_size,
        )
    if kind == "fashion_mnist":
        path = params.get("dataset_path") or FASHION_MNIST_ROOT
        return fashion_mnist_spec(path, params["resolution"], params["channels"], pool_size=pool_size)
    if kind == "images":
        if not params.get("dataset_path"):
            raise ValueError("dataset='images' needs dataset_path (an EDM zip or folder of images)")
        return images_spec(params["dataset_path"], pool_size)
    raise ValueError(f"unknown dataset {kind!r}; expected 'molrg', 'fashion_mnist' or 'images'")


def data_shape(spec: Mapping[str, Any]) -> tuple[int, int]:
    """(channels, resolution) of the spec's points."""
    if spec["source"] in ("molrg", "fashion_mnist"):
        return int(spec["channels"]), int(spec["resolution"])
    from ..data import iter_image_batches

    first = next(iter_image_batches(spec["path"], 1, max_images=1))
    return int(first.shape[1]), int(first.shape[-1])


def make_molrg(spec: Mapping[str, Any]):
    """The :class:`nbhelpers.molrg.MoLRG` of a molrg spec."""
    from ..molrg import MoLRG

    if spec["source"] != "molrg":
        raise ValueError(f"data source {spec['source']!r} is not a MoLRG")
    return MoLRG.create(
        spec["num_classes"],
        spec["intrinsic_dim"],
        spec["resolution"],
        spec["channels"],
        generator=int(spec["seed"]),
    )


def molrg_draw(spec: Mapping[str, Any], count: int, seed: int, labels: bool = False):
    """``count`` MoLRG points (float32 (count, C, R, R), classes shuffled) drawn from ``seed``;
    with ``labels`` also their classes (count,) int64."""
    model = make_molrg(spec)
    g = torch.Generator().manual_seed(int(seed))
    x, y = model.sample(-(-int(count) // model.num_classes), generator=g)
    perm = torch.randperm(len(x), generator=g)[: int(count)]
    return (x[perm].contiguous(), y[perm].contiguous()) if labels else x[perm].contiguous()


# Seed streams of a MoLRG spec: pool (training sets), fresh (held-out) and spare draws.
_POOL_STREAM, _FRESH_STREAM = 1, 2


def molrg_stream(spec: Mapping[str, Any], stream: int) -> int:
    """Seed of the ``stream``-th independent draw of a MoLRG spec (1: pool, 2: fresh samples)."""
    return int(spec["seed"]) * 1000 + int(stream)


@functools.lru_cache(maxsize=4)
def _pool_cached(key: str) -> torch.Tensor:
    spec = json.loads(key)
    source, size = spec["source"], int(spec["pool_size"])
    if source == "molrg":
        return molrg_draw(spec, size, molrg_stream(spec, _POOL_STREAM))
    if source == "fashion_mnist":
        from ..data import load_fashion_mnist

        images, _ = load_fashion_mnist(
            spec["path"],
            train=True,
            max_images=size,
            resolution=spec["resolution"],
            channels=spec["channels"],
        )
    else:
        from ..data import load_images

        images, _ = load_images(spec["path"], max_images=size)
    if len(images) < size:
        raise ValueError(f"{spec['path']}: holds {len(images)} images, fewer than pool_size={size}")
    return torch.from_numpy(images)


def load_pool(spec: Mapping[str, Any]) -> torch.Tensor:
    """The pool (pool_size, C, R, R): float32 model space for MoLRG, uint8 for images (cached per process)."""
    if "pool_size" not in spec:
        raise ValueError("the data spec has no pool_size")
    return _pool_cached(json.dumps(dict(spec), sort_keys=True))


def training_set(spec: Mapping[str, Any], n: int) -> torch.Tensor:
    """The first ``n`` points of the pool (nested training sets)."""
    pool = load_pool(spec)
    if not 1 <= int(n) <= len(pool):
        raise ValueError(f"training-set size {n} outside 1..{len(pool)} (the pool)")
    return pool[: int(n)]


def fresh_samples(spec: Mapping[str, Any], count: int) -> torch.Tensor:
    """``count`` points of the data distribution that lie in no training set.

    MoLRG: new draws; Fashion-MNIST: the test split; images: the images after the pool.
    """
    source = spec["source"]
    if source == "molrg":
        return molrg_draw(spec, count, molrg_stream(spec, _FRESH_STREAM))
    if source == "fashion_mnist":
        from ..data import load_fashion_mnist

        images, _ = load_fashion_mnist(
            spec["path"],
            train=False,
            max_images=int(count),
            resolution=spec["resolution"],
            channels=spec["channels"],
        )
        if len(images) < count:
            raise ValueError(f"{spec['path']}: the test split holds {len(images)} images, fewer than {count}")
        return torch.from_numpy(images)
    from ..data import load_images

    pool = int(spec["pool_size"])
    images, _ = load_images(spec["path"], max_images=pool + int(count))
    if len(images) <= pool:
        raise ValueError(f"{spec['path']}: no images beyond the pool of {pool} to serve as fresh samples")
    return torch.from_numpy(images[pool:])


def store_samples(x: torch.Tensor, spec: Mapping[str, Any]) -> np.ndarray:
    """float samples -> what a cell stores: float32 model space (MoLRG) or EDM-quantised uint8 images."""
    from ..data import to_uint8

    if spec["source"] == "molrg":
        return x.float().cpu().numpy()
    return to_uint8(x.cpu()).numpy()


# ----------------------------------------------------------------------------
# Training configs and training.


def train_config(
    arch: str, precond: str, network: Mapping[str, Any], train: Mapping[str, Any], **fixed: Any
) -> dict[str, Any]:
    """A ``TrainConfig`` dict from the notebook's ``train`` section plus the fixed fields, validated.

    ``train`` may not set the fields given separately (arch, precond, network and ``fixed``): a
    clash or an unknown key is a ValueError naming it.
    """
    from ..training import TrainConfig

    own = {"arch", "precond", "network", *fixed}
    clash = sorted(own & set(train))
    if clash:
        raise ValueError(f"train: {clash} are set elsewhere in the notebook's parameters; remove them here")
    cfg = {"arch": str(arch), "precond": str(precond), "network": dict(network), **dict(train), **fixed}
    TrainConfig.from_dict(cfg)  # raises with the offending keys
    return cfg


def train_model(
    train: Mapping[str, Any],
    data: torch.Tensor,
    device: torch.device,
    workdir: str | Path | None = None,
    net: torch.nn.Module | None = None,
    **overrides: Any,
) -> tuple[Any, dict[str, Any]]:
    """Train on ``data`` (uint8 images or float model space) with the config dict ``train``.

    With ``workdir`` the run keeps its snapshots and state dumps there and resumes from the newest
    dump; ``net`` is a prebuilt trainable denoiser (e.g. ``molrg.LowRankDenoiser``) instead of the
    config's network. Returns the EMA network and facts: steps, kimg, final_loss, train_seconds, params.
    """
    from ..training import TrainConfig
    from ..training import train as run_training

    cfg = TrainConfig.from_dict({**dict(train), **overrides})
    if "log_every" not in overrides:
        cfg.log_every = max(1, cfg.num_steps() // 20)
    t0 = time.perf_counter()
    result = run_training(
        cfg,
        data,
        outdir=workdir,
        device=device,
        progress=False,
        resume="auto" if workdir is not None else None,
        net=net,
    )
    seconds = time.perf_counter() - t0
    if workdir is not None and result.history:  # steps done before a resume count too
        seconds, prev = 0.0, 0
        for h in result.history:
            seconds += (h["step"] - prev) * cfg.batch_size / max(h["images_per_sec"], 1e-9)
            prev = h["step"]
    losses = [h["loss"] for h in result.history]
    info = {
        "steps": result.steps,
        "kimg": result.kimg,
        "final_loss": losses[-1] if losses else None,
        "train_seconds": seconds,
        "params": sum(p.numel() for p in result.ema.parameters()),
    }
    return result.ema, info


def training_loss(
    net: Any,
    data: torch.Tensor,
    loss: str,
    device: torch.device,
    draws: int = 64,
    seed: int = 0,
    batch_size: int = 4096,
    loss_kwargs: Mapping[str, Any] | None = None,
) -> float:
    """The training objective of ``net`` on ``data``: the denoising loss ``loss`` ('edm', 've', 'vp', with
    a train config's ``loss_kwargs``) averaged over ``draws`` noise draws (sigma and noise) per point,
    per element, float.

    The draws come from ``seed`` alone, so every model evaluated with the same seed sees the same
    noise (common random numbers): differences between models are not sampling noise.
    """
    from ..data import model_space
    from ..losses import make_loss

    fn = make_loss(loss, **dict(loss_kwargs or {}))
    x = model_space(data, device)
    x = x.repeat(int(draws), *([1] * (x.ndim - 1)))
    g = torch.Generator(device=device).manual_seed(int(seed))
    total, count = 0.0, 0
    was_training = getattr(net, "training", False)
    if hasattr(net, "eval"):
        net.eval()
    with torch.no_grad():
        for lo in range(0, len(x), int(batch_size)):
            xb = x[lo : lo + int(batch_size)]
            per = fn.evaluate(net, xb, None, fn.draw(xb.shape, g, device))
            total, count = total + float(per.double().sum()), count + per.numel()
    if was_training:
        net.train()
    return total / count


def train_restarts(
    train: Mapping[str, Any],
    data: torch.Tensor,
    nets: Sequence[torch.nn.Module],
    device: torch.device,
    loss_draws: int = 64,
    loss_seed: int = 0,
) -> tuple[list[Any], int, list[dict[str, Any]]]:
    """Train each of ``nets`` (restart i with seed ``train['seed'] + i``) and keep the one with the lowest
    training loss (:func:`lowest_loss`); nothing else enters the choice.

    Returns every restart's trained EMA network, the index of the kept one and one fact dict per
    restart (``loss`` and train_model's facts).
    """
    if not nets:
        raise ValueError("train_restarts needs at least one network")
    trained, facts = [], []
    for i, net in enumerate(nets):
        ema, info = train_model({**dict(train), "seed": int(train.get("seed", 0)) + i}, data, device, net=net)
        trained.append(ema)
        facts.append(info)
    best, losses = lowest_loss(train, trained, data, device, loss_draws, loss_seed)
    for info, value in zip(facts, losses):
        info["loss"] = value
    return trained, best, facts


def loss_name(train: Mapping[str, Any]) -> str:
    """The denoising loss a training-config dict trains with (:attr:`TrainConfig.loss_name`, with
    TrainConfig's default precond where the dict gives none)."""
    from ..training import TrainConfig

    return str(train.get("loss") or train.get("precond", TrainConfig.precond))


def lowest_loss(
    train: Mapping[str, Any],
    nets: Sequence[Any],
    data: torch.Tensor,
    device: torch.device,
    draws: int = 64,
    seed: int = 0,
) -> tuple[int, list[float]]:
    """The index of the net with the lowest training loss on ``data`` (the loss of ``train`` with its
    ``loss_kwargs``, the same ``draws`` for every net: :func:`training_loss`), and every net's loss."""
    kw = train.get("loss_kwargs")
    losses = [training_loss(net, data, loss_name(train), device, draws, seed, loss_kwargs=kw) for net in nets]
    return min(range(len(losses)), key=losses.__getitem__), losses


def train_stacked(
    train: Mapping[str, Any], datasets: Sequence[torch.Tensor], nets: Sequence[Any], device: torch.device
) -> tuple[list[Any], dict[str, Any]]:
    """Train low-rank models, ``nets[i]`` on ``datasets[i]`` (float, all of one shape), as one
    :class:`nbhelpers.molrg.LowRankStack`: one optimizer step moves all of them at once.

    The models share batch positions and sigma draws, never data, noise or parameters. Returns the
    trained EMA members in order and train_model's facts for the stack.
    """
    from ..molrg import LowRankStack

    if len(datasets) != len(nets) or not nets:
        raise ValueError(f"train_stacked needs one data set per net, got {len(datasets)} for {len(nets)}")
    if train.get("grad_clip") is not None:
        raise ValueError("grad_clip would clip the stack's joint gradient norm and couple its models")
    ema, info = train_model(train, torch.cat(list(datasets), dim=1), device, net=LowRankStack(nets))
    return ema.members(), info


def num_steps(train: Mapping[str, Any]) -> int:
    """Optimizer steps of a training-config dict (``total_steps`` or ``duration_kimg`` / batch)."""
    if train.get("total_steps"):
        return int(train["total_steps"])
    return max(1, math.ceil(float(train["duration_kimg"]) * 1000 / int(train["batch_size"])))


# ----------------------------------------------------------------------------
# Sampling at the evaluation seeds.


EDM_SAMPLER = {"num_steps": 18, "sigma_min": 0.002, "sigma_max": 80.0, "rho": 7.0, "order": 2}
"""EDM's deterministic sampler: 18 Heun steps from sigma 80 to 0.002, rho 7 (a :func:`sample` spec)."""


def sampler_spec(params: Mapping[str, Any], order: int | None = None) -> dict[str, Any]:
    """The EDM sampler settings of a notebook: num_steps, sigma_min, sigma_max, rho, order (2 = Heun)."""
    return {
        "num_steps": int(params["num_steps"]),
        "sigma_min": float(params["sigma_min"]),
        "sigma_max": float(params["sigma_max"]),
        "rho": float(params["rho"]),
        "order": int(order if order is not None else params["sampler_order"]),
    }


def sample(
    net: Any, sampler: Mapping[str, Any], seeds: str | Sequence[int], batch_size: int, device: torch.device
) -> torch.Tensor:
    """float64 samples (S, C, R, R) of ``net`` from the per-seed initial noise of ``seeds``."""
    from ..sampling import generate

    return generate(net, seeds, batch_size=int(batch_size), device=device, output="float", **sampler)
