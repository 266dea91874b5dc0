"""The ``nbhelpers`` command: one subcommand per command of the authors' README, same option names.

    nbhelpers generate     ~ edm/generate.py            (also --optimal_denoiser, zip output, noise export)
    nbhelpers dataset      ~ edm/dataset_tool.py
    nbhelpers train        ~ edm/train.py               (works under torchrun --nproc_per_node=K)
    nbhelpers train-molrg  ~ edm/trainMoLRG.py
    nbhelpers sscd feature|rpscore|mscore ~ edm/sscd.py
    nbhelpers jacobian     ~ edm/jacobian.py

Bad paths and mismatched inputs exit with status 2 and a message naming the file. Each subcommand
imports the modules it needs (and torch, pandas) when it runs, so ``nbhelpers --help`` starts fast.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text, check_writable
from .download import DownloadError, resolve

EXIT_USAGE = 2
DISCRETIZATIONS = ("vp", "ve", "iddpm", "edm")  # = schedules.DISCRETIZATIONS (the CLI imports lazily)
SCHEDULES = ("vp", "ve", "linear")
SCALINGS = ("vp", "none")


class CLIError(Exception):
    """A user error: printed as ``nbhelpers <cmd>: error: ...`` with exit status 2."""


# ----------------------------------------------------------------------------
# Helpers.


def _device(name: str | None):
    from .devices import default_device

    return default_device(name)


def _int_list(s: str) -> list[int]:
    from .sampling import parse_seeds

    try:
        return parse_seeds(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (0/1/true/false), got {s!r}")


def _resolution(s: str) -> tuple[int, int]:
    """``R`` or ``WxH`` as (width, height)."""
    m = re.fullmatch(r"(\d+)(?:x(\d+))?", s)
    if not m or int(m.group(1)) < 1 or (m.group(2) and int(m.group(2)) < 1):
        raise argparse.ArgumentTypeError(f"expected a resolution like 32 or 32x32, got {s!r}")
    return int(m.group(1)), int(m.group(2) or m.group(1))


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {v}")
    return v


def _float_list(s: str) -> list[float]:
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from None


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _print0(*args: Any) -> None:
    if _rank0():
        print(*args, flush=True)


def _load_net(path_or_url: str, device):
    from .checkpoints import load_network

    return load_network(path_or_url, device=device)


def _parser(
    sub, name: str, help: str, example: str, description: str | None = None
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=(description or help) + "\n\nExample:\n  " + example,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# ----------------------------------------------------------------------------
# generate


def _add_generate(sub) -> None:
    p = _parser(
        sub,
        "generate",
        "Generate images from a network (or the optimal denoiser) with EDM's sampler.",
        "nbhelpers generate --outdir=out --seeds=0-49999 --batch=64 "
        "--network=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl",
    )
    p.add_argument("--network", metavar="PKL|URL", help="network snapshot (EDM .pkl or nbhelpers checkpoint)")
    p.add_argument(
        "--outdir", required=True, metavar="DIR|ZIP", help="where to save PNGs (a folder, or a .zip)"
    )
    p.add_argument(
        "--seeds",
        type=_int_list,
        default=_int_list("0-63"),
        metavar="LIST",
        help="e.g. 0-49999 (default 0-63)",
    )
    p.add_argument("--subdirs", action="store_true", help="one subfolder per 1000 seeds")
    p.add_argument("--class", dest="class_idx", type=int, metavar="INT", help="class label (default: random)")
    p.add_argument("--batch", type=int, default=64, metavar="INT", help="maximum batch size (default 64)")
    _add_sampler_options(p, ablation=True)
    p.add_argument(
        "--solver", choices=["euler", "heun"], help="ODE solver (default heun; euler with --optimal_denoiser)"
    )
    p.add_argument(
        "--disc",
        choices=list(DISCRETIZATIONS),
        help="ablate the time step discretisation (EDM's ablation sampler)",
    )
    p.add_argument(
        "--schedule",
        choices=list(SCHEDULES),
        help="ablate the noise schedule sigma(t) (default linear with --disc)",
    )
    p.add_argument(
        "--scaling", choices=list(SCALINGS), help="ablate the signal scaling s(t) (default none with --disc)"
    )
    p.add_argument(
        "--optimal_denoiser", action="store_true", help="sample the empirical optimal denoiser of --dataset"
    )
    p.add_argument("--dataset", metavar="ZIP|DIR", help="training set of the optimal denoiser")
    p.add_argument(
        "--max-images", dest="max_images", type=int, metavar="INT", help="first N images of --dataset"
    )
    p.add_argument(
        "--export-noise", dest="export_noise", metavar="NPZ", help="also write the initial noise per seed"
    )
    p.add_argument("--noise", metavar="NPZ", help="start from this exported noise instead of the seeds' own")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute every image (default: keep the images a previous identical run already wrote)",
    )
    p.add_argument("--device", help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    p.set_defaults(func=cmd_generate)


def _sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, in sorted order)."""
    path, h = Path(path), hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _check_image_output(out: str) -> None:
    """Before any compute: the --outdir folder (or the .zip and its staging folder) can be written."""
    path = Path(out)
    if path.suffix.lower() == ".zip":
        check_writable(path)
        check_writable(path.parent / f".{path.name}.partial", folder=True)
    else:
        check_writable(path, folder=True)


def _add_sampler_options(p: argparse.ArgumentParser, ablation: bool, steps_help: str | None = None) -> None:
    """EDM's sampler options (generate.py and jacobian.py share them); sigma defaults 0.002 and 80."""
    p.add_argument(
        "--steps",
        type=_positive_int,
        default=None if steps_help else 18,
        metavar="INT",
        help=steps_help or "number of sampling steps (default 18)",
    )
    lo = "; with --disc: vp 0.0105, ve 0.02, iddpm and edm 0.002" if ablation else ""
    hi = "; with --disc: vp 152, ve 100, iddpm 81, edm 80" if ablation else ""
    p.add_argument(
        "--sigma_min", type=_positive_float, metavar="FLOAT", help=f"lowest noise level (default 0.002{lo})"
    )
    p.add_argument(
        "--sigma_max", type=_positive_float, metavar="FLOAT", help=f"highest noise level (default 80{hi})"
    )
    p.add_argument(
        "--rho", type=_positive_float, default=7.0, metavar="FLOAT", help="time step exponent (default 7)"
    )
    p.add_argument(
        "--S_churn", type=float, default=0.0, metavar="FLOAT", help="stochasticity strength (default 0)"
    )
    p.add_argument(
        "--S_min", type=float, default=0.0, metavar="FLOAT", help="stoch. min noise level (default 0)"
    )
    p.add_argument(
        "--S_max", type=float, default=math.inf, metavar="FLOAT", help="stoch. max noise level (default inf)"
    )
    p.add_argument(
        "--S_noise", type=float, default=1.0, metavar="FLOAT", help="stoch. noise inflation (default 1)"
    )


def _ablation(a: argparse.Namespace, solver: str):
    """EDM's ablation sampler for --disc/--schedule/--scaling (None without them), as generate.py picks it."""
    if a.disc is None and a.schedule is None and a.scaling is None:
        return None

    from .schedules import ablation_sampler

    return functools.partial(
        ablation_sampler,
        num_steps=a.steps,
        sigma_min=a.sigma_min,
        sigma_max=a.sigma_max,
        rho=a.rho,
        solver=solver,
        discretization=a.disc or "edm",
        schedule_name=a.schedule or "linear",
        scaling=a.scaling or "none",
        S_churn=a.S_churn,
        S_min=a.S_min,
        S_max=a.S_max,
        S_noise=a.S_noise,
    )


def _sampling_net(a: argparse.Namespace, device, record: dict[str, Any]):
    """(net, order) that ``generate`` samples: a snapshot (``--network``) or the optimal denoiser of
    ``--dataset``; what identifies it goes into ``record``."""
    if a.optimal_denoiser:
        if not a.dataset:
            raise CLIError("--optimal_denoiser needs --dataset")
        from .data import load_images
        from .optimal import OptimalDenoiser

        images, _ = load_images(a.dataset, max_images=a.max_images)
        order = 2 if a.solver == "heun" else 1
        record["optimal_denoiser_of"] = hashlib.sha256(images.tobytes()).hexdigest()
        solver = "Heun" if order == 2 else "Euler"
        _print0(f"Optimal denoiser of {a.dataset} ({len(images)} images), {solver} steps")
        return OptimalDenoiser(images, device=device), order
    if not a.network:
        raise CLIError("--network is required (or use --optimal_denoiser --dataset)")
    network = resolve(a.network)
    record["network_sha256"] = _sha256(network)
    return _load_net(str(network), device), 1 if a.solver == "euler" else 2


def _noise_for(a: argparse.Namespace, seeds: list[int], record: dict[str, Any]):
    """The initial noise of ``seeds`` from the ``--noise`` file, in seed order, or None without one."""
    from .sampling import load_noise

    if not a.noise:
        return None
    noise_seeds, latents = load_noise(a.noise)
    wanted = {s: i for i, s in enumerate(noise_seeds)}
    missing = [s for s in seeds if s not in wanted]
    if missing:
        raise CLIError(f"{a.noise}: no noise for seeds {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    record["noise_sha256"] = _sha256(a.noise)
    return latents[[wanted[s] for s in seeds]]


def cmd_generate(a: argparse.Namespace) -> int:
    from .sampling import export_noise, generate

    _check_image_output(a.outdir)
    if a.export_noise:
        check_writable(a.export_noise)
    device = _device(a.device)
    record: dict[str, Any] = {}
    net, order = _sampling_net(a, device, record)
    seeds = a.seeds
    latents = _noise_for(a, seeds, record)
    shape = (int(net.img_channels), int(net.img_resolution), int(net.img_resolution))
    churn = dict(S_churn=a.S_churn, S_min=a.S_min, S_max=a.S_max, S_noise=a.S_noise)
    record.update(
        steps=a.steps, sigma_min=a.sigma_min, sigma_max=a.sigma_max, rho=a.rho, order=order, **churn
    )
    record.update(S_max=repr(a.S_max), class_idx=a.class_idx, subdirs=a.subdirs)
    if a.export_noise:
        export_noise(seeds, shape, a.export_noise)
        _print0(f"Initial noise for {len(seeds)} seeds written to {a.export_noise}")
    _print0(f"Generating {len(seeds)} images to {a.outdir} ...")
    sigma_range = dict(
        sigma_min=0.002 if a.sigma_min is None else a.sigma_min,
        sigma_max=80.0 if a.sigma_max is None else a.sigma_max,
    )
    sampler = _ablation(a, "heun" if order == 2 else "euler")
    generate(
        net,
        seeds,
        batch_size=a.batch,
        device=device,
        class_labels=a.class_idx,
        num_steps=a.steps,
        rho=a.rho,
        order=order,
        sampler=sampler,
        latents=latents,
        out=a.outdir,
        subdirs=a.subdirs,
        progress=True,
        skip_existing=not a.overwrite,
        record=record,
        **sigma_range,
        **churn,
    )
    _print0("Done.")
    return 0


# ----------------------------------------------------------------------------
# dataset


def _add_dataset(sub) -> None:
    p = _parser(
        sub,
        "dataset",
        "Convert images to EDM's dataset format (folder or zip), e.g. a nested subset.",
        "nbhelpers dataset --source=out --max-images=128 --dest=datasets/synthetic-cifar10-32x32-n128.zip",
        "Convert a folder/zip of images, the CIFAR-10 python tarball or a folder of Fashion-MNIST IDX files.",
    )
    p.add_argument(
        "--source", required=True, metavar="PATH", help="input folder, zip, CIFAR-10 tarball or IDX folder"
    )
    p.add_argument("--dest", required=True, metavar="PATH", help="output folder or .zip")
    p.add_argument("--max-images", dest="max_images", type=int, metavar="INT", help="keep the first N images")
    p.add_argument(
        "--transform",
        choices=["center-crop", "center-crop-wide"],
        help=(
            "crop mode, with --resolution WxH (EDM's): the centred "
            "square, or a wide band letterboxed on a square"
        ),
    )
    p.add_argument(
        "--resolution",
        type=_resolution,
        metavar="R|WxH",
        help="output size: square images area-resized to R x R; with --transform, the crop's W x H",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --dest")
    p.set_defaults(func=cmd_dataset)


def cmd_dataset(a: argparse.Namespace) -> int:
    from .data import convert_dataset

    dest = Path(a.dest)
    if dest.exists() and not a.overwrite:
        raise CLIError(f"{dest}: already exists (use --overwrite)")
    if a.transform and a.resolution is None:
        raise CLIError(f"--transform {a.transform} needs --resolution WxH")
    if a.resolution is not None and not a.transform and a.resolution[0] != a.resolution[1]:
        raise CLIError(
            f"--resolution {a.resolution[0]}x{a.resolution[1]}: not square (only --transform makes it so)"
        )
    if a.transform == "center-crop" and a.resolution[0] != a.resolution[1]:
        raise CLIError("--transform center-crop gives W x H images; the data set needs them square (W = H)")
    if a.transform == "center-crop-wide" and a.resolution[1] > a.resolution[0]:
        raise CLIError("--transform center-crop-wide needs H <= W (a band pasted into a W x W square)")
    if dest.suffix.lower() == ".zip":
        check_writable(dest)
    else:  # written beside, then renamed
        check_writable(dest.parent, folder=True)
    out = convert_dataset(
        a.source,
        a.dest,
        max_images=a.max_images,
        resolution=a.resolution,
        overwrite=a.overwrite,
        transform=a.transform,
    )
    print(f"Wrote {out}")
    return 0


# ----------------------------------------------------------------------------
# train / train-molrg (shared options)


def _add_training_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """The options train and train-molrg share; ``defaults`` holds the ones they set differently."""
    _add_hyperparameters(p, defaults)
    _add_performance_options(p, defaults)
    _add_io_options(p, defaults)


def _add_hyperparameters(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """EDM's hyperparameters (names and units as its train.py)."""
    g = p.add_argument_group("hyperparameters (EDM's names and units)")
    g.add_argument(
        "--cond",
        type=_bool,
        default=False,
        metavar="BOOL",
        help="class-conditional (labels from dataset.json)",
    )
    g.add_argument(
        "--precond", choices=["vp", "ve", "edm"], default=defaults["precond"], help="preconditioning and loss"
    )
    g.add_argument(
        "--duration", type=float, default=defaults["duration"], metavar="MIMG", help="training length in Mimg"
    )
    g.add_argument("--batch", type=int, default=defaults["batch"], metavar="INT", help="total batch size")
    g.add_argument(
        "--batch-gpu", dest="batch_gpu", type=int, metavar="INT", help="limit batch size per GPU/process"
    )
    g.add_argument(
        "--cbase",
        "--model_channels",
        dest="model_channels",
        type=int,
        metavar="INT",
        help="channel multiplier (model_channels)",
    )
    g.add_argument(
        "--cres",
        type=lambda s: [int(v) for v in s.split(",")],
        metavar="LIST",
        help="channels per resolution (channel_mult)",
    )
    g.add_argument("--lr", type=float, default=1e-3, metavar="FLOAT", help="learning rate (default 1e-3)")
    g.add_argument(
        "--lr-rampup",
        dest="lr_rampup",
        type=float,
        default=10.0,
        metavar="MIMG",
        help="lr ramp-up (default 10 Mimg)",
    )
    g.add_argument("--ema", type=float, default=0.5, metavar="MIMG", help="EMA half-life (default 0.5 Mimg)")
    g.add_argument(
        "--dropout", type=float, default=0.13, metavar="FLOAT", help="dropout probability (default 0.13)"
    )
    g.add_argument(
        "--augment", type=float, default=defaults["augment"], metavar="FLOAT", help="augmentation probability"
    )
    g.add_argument(
        "--xflip", type=_bool, default=False, metavar="BOOL", help="dataset x-flips (augmentation)"
    )


def _add_performance_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """Precision, compilation and the options accepted for EDM's scripts."""
    g = p.add_argument_group("performance")
    g.add_argument(
        "--fp16", type=_bool, default=False, metavar="BOOL", help="mixed precision (fp16 autocast)"
    )
    g.add_argument(
        "--precision", choices=["fp32", "bf16", "fp16"], help="autocast precision (overrides --fp16)"
    )
    g.add_argument("--compile", action="store_true", help="torch.compile the network")
    g.add_argument(
        "--ls",
        type=_positive_float,
        default=1.0,
        metavar="FLOAT",
        help=(
            "loss scaling: the loss is multiplied by this before "
            "backward (default 1; Adam is nearly invariant to it)"
        ),
    )
    g.add_argument(
        "--bench",
        type=_bool,
        default=True,
        metavar="BOOL",
        help="cuDNN benchmarking (default 1; only affects CUDA convolutions)",
    )
    if defaults.get("cache"):
        g.add_argument(
            "--cache",
            type=_bool,
            default=True,
            metavar="BOOL",
            help=(
                "accepted for EDM's train.py; the data set is always "
                "held in memory (on the device), so 0 changes nothing"
            ),
        )
    g.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        metavar="INT",
        help=(
            "accepted for EDM's scripts; batches are indexed from "
            "the in-memory data set, so no DataLoader workers run"
        ),
    )
    g.add_argument("--device", help="cuda, cpu ... (default: cuda if available; LOCAL_RANK under torchrun)")


def _add_io_options(p: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """Output folder, intervals, seed, transfer and resume."""
    g = p.add_argument_group("I/O")
    g.add_argument("--desc", metavar="STR", help="string to include in the result folder name")
    g.add_argument("--nosubdir", action="store_true", help="do not create a numbered subfolder for the run")
    g.add_argument(
        "--tick", type=float, default=50, metavar="KIMG", help="progress interval (default 50 kimg)"
    )
    g.add_argument(
        "--snap", type=int, default=defaults["snap"], metavar="TICKS", help="snapshot interval in ticks"
    )
    g.add_argument(
        "--dump", type=int, default=500, metavar="TICKS", help="state dump interval in ticks (default 500)"
    )
    g.add_argument(
        "--seed", type=int, default=0, metavar="INT", help="random seed (default 0; EDM's is random)"
    )
    g.add_argument("--transfer", metavar="PKL|URL", help="initialise from a network snapshot (fine-tuning)")
    g.add_argument(
        "--resume",
        metavar="PT|DIR|latest|BOOL",
        help="resume from a training-state file or run folder (continues there), or 'latest' (also 1/true, "
        "as trainMoLRG.py's boolean): the newest run of the same "
        "description; data and options must match the saved run",
    )
    g.add_argument(
        "--allow-changed",
        dest="allow_changed",
        type=lambda s: [v.strip().lstrip("-") for v in s.split(",") if v.strip()],
        default=[],
        metavar="LIST",
        help="on resume, options allowed to differ from the saved run, e.g. lr or data (a deliberate change)",
    )
    if defaults.get("molrg"):
        g.add_argument(
            "--resumedir",
            metavar="DIR",
            help=(
                "run folder to continue in: resume from its newest "
                "training-state file, or start there if it has none"
            ),
        )
        g.add_argument(
            "--optimizer",
            choices=["adam", "sgd"],
            default="adam",
            help="optimizer (default adam; sgd is plain SGD)",
        )
    g.add_argument("-n", "--dry-run", dest="dry_run", action="store_true", help="print the options and exit")


def _train_config(a: argparse.Namespace, arch: str, network: dict[str, Any]):
    from .training import TrainConfig

    if a.model_channels is not None:
        network["model_channels"] = a.model_channels
    if a.cres is not None:
        network["channel_mult"] = a.cres
    precision = a.precision or ("fp16" if a.fp16 else "fp32")
    augment_kwargs = {"xflip": 1e8} if a.xflip and a.augment == 0 else {}
    augment_p = a.augment if a.augment > 0 else (1.0 if a.xflip else 0.0)
    return TrainConfig(
        arch=arch,
        precond=a.precond,
        network=network,
        batch_size=a.batch,
        batch_gpu=a.batch_gpu,
        duration_kimg=a.duration * 1000,
        lr=a.lr,
        lr_rampup_kimg=a.lr_rampup * 1000,
        ema_halflife_kimg=a.ema * 1000,
        ema_rampup_ratio=None if a.transfer else 0.05,
        dropout=a.dropout,
        augment_p=augment_p,
        augment_kwargs=augment_kwargs,
        seed=a.seed,
        snapshot_kimg=a.snap * a.tick,
        state_dump_kimg=a.dump * a.tick,
        log_every=max(1, round(a.tick * 1000 / a.batch)),
        precision=precision,
        compile=a.compile,
        optimizer=getattr(a, "optimizer", "adam"),
        loss_scaling=a.ls,
    )


def _run_dir(outdir: str, desc: str, nosubdir: bool, resume: str | None) -> Path:
    """EDM's numbered run folder ``<outdir>/<id:05d>-<desc>``. ``--resume latest``: the newest run
    folder of the same description that holds a state dump; ``--resume PATH``: PATH's own folder."""
    from .training import find_latest_state

    if resume not in (None, "latest"):
        path = Path(resume)
        if path.is_dir():
            return path
        if path.is_file():
            return path.parent
        raise CLIError(f"{resume}: no such training-state file or run folder")
    out = Path(outdir)
    if nosubdir:
        return out
    ids = []
    if out.is_dir():
        for child in out.iterdir():
            m = re.match(r"^(\d+)-(.*)$", child.name)
            if child.is_dir() and m:
                ids.append((int(m.group(1)), m.group(2), child))
    if resume == "latest":
        same = [(i, child) for i, d, child in ids if d == desc and find_latest_state(child) is not None]
        if not same:
            others = ", ".join(child.name for *_, child in sorted(ids)[-3:]) or "none"
            raise CLIError(
                f"{out}: --resume latest found no earlier run '{desc}' with a state dump (run folders: "
                f"{others}); check --data and the options, or resume a folder with --resume PATH"
            )
        return max(same)[1]
    return out / f"{max((i for i, *_ in ids), default=-1) + 1:05d}-{desc}"


# --allow-changed accepts the command-line names too (mapped to TrainConfig fields).
_ALLOW_CHANGED = {
    "lr-rampup": "lr_rampup_kimg",
    "lr_rampup": "lr_rampup_kimg",
    "ema": "ema_halflife_kimg",
    "batch": "batch_size",
    "augment": "augment_p",
    "xflip": "augment_kwargs",
    "fp16": "precision",
    "cbase": "network",
    "model_channels": "network",
    "cres": "network",
    "num_blocks": "network",
    "attn": "network",
    "embed_channels": "network",
    "cond": "label_dim",
}


def _resume_option(value: str | None) -> str | None:
    """--resume: a state file, 'latest', or a boolean (trainMoLRG.py's): true means 'latest'."""
    if value is None or value.lower() in ("0", "false", "no", "off", ""):
        return None
    return "latest" if value.lower() in ("latest", "1", "true", "yes", "on") else value


def _train_common(a: argparse.Namespace, config, data, desc: str, net=None, extra: dict | None = None) -> int:
    from .training import train

    world = int(os.environ.get("WORLD_SIZE", "1"))
    desc = f"{desc}-gpus{world}-batch{config.batch_size}-{config.precision}" + (
        f"-{a.desc}" if a.desc else ""
    )
    resume = _resume_option(a.resume)
    resumedir = getattr(a, "resumedir", None)
    if a.transfer and (resume or resumedir):
        raise CLIError("--transfer and --resume/--resumedir cannot be given together")
    if resumedir:
        run_dir, resume = Path(resumedir), "auto"  # its newest state dump, or a fresh start there
    else:
        run_dir = _run_dir(a.outdir, desc, a.nosubdir, resume)
    options = {"config": config.to_dict(), "run_dir": str(run_dir), "world_size": world, **(extra or {})}
    _print0("Training options:\n" + json.dumps(options, indent=2))
    if a.dry_run:
        _print0("Dry run; exiting.")
        return 0
    if a.transfer:
        net = _load_net(a.transfer, "cpu")
        net.train().requires_grad_(True)
    if resume not in (None, "latest", "auto"):  # a run folder continues from its newest state dump
        resume = "latest" if Path(resume).is_dir() else resume
    import torch

    torch.backends.cudnn.benchmark = bool(a.bench)
    device = None if a.device is None else _device(a.device)
    allow = sorted({_ALLOW_CHANGED.get(n, n) for n in a.allow_changed})
    result = train(
        config,
        data,
        outdir=run_dir,
        device=device,
        resume=resume,
        progress=_rank0(),
        net=net,
        allow_changed=allow,
    )
    _print0(f"Finished: {result.steps} steps, {result.kimg:.1f} kimg. Snapshots in {run_dir}")
    return 0


def _add_train(sub) -> None:
    p = _parser(
        sub,
        "train",
        "Train a diffusion model on an image data set (EDM's train.py; runs under torchrun).",
        "torchrun --standalone --nproc_per_node=1 -m nbhelpers train --outdir=training "
        "--data=datasets/synthetic-cifar10-32x32-n128.zip --cond=0 --arch=ddpmpp --duration 50 --batch 128 "
        "--snap 500 --dump 500 --precond vp --model_channels 64",
    )
    p.add_argument("--outdir", required=True, metavar="DIR", help="where to save the results")
    p.add_argument("--data", required=True, metavar="ZIP|DIR", help="path to the dataset")
    p.add_argument("--max-images", dest="max_images", type=int, metavar="INT", help="use the first N images")
    p.add_argument(
        "--arch", choices=["ddpmpp", "ncsnpp", "adm", "mlp"], default="ddpmpp", help="network architecture"
    )
    p.add_argument("--num_blocks", type=int, metavar="INT", help="residual blocks per resolution")
    p.add_argument(
        "--attn",
        type=lambda s: [int(v) for v in s.split(",") if v],
        metavar="LIST",
        help="attention resolutions",
    )
    _add_training_options(
        p, {"precond": "vp", "duration": 200.0, "batch": 512, "augment": 0.12, "snap": 50, "cache": True}
    )
    p.set_defaults(func=cmd_train)


def _check_train_output(a: argparse.Namespace) -> None:
    if not a.dry_run:
        check_writable(a.outdir, folder=True)


def cmd_train(a: argparse.Namespace) -> int:
    from .data import load_images

    _check_train_output(a)

    images, labels = load_images(a.data, max_images=a.max_images)
    if a.cond and labels is None:
        raise CLIError(f"{a.data}: --cond=1 requires labels in dataset.json")
    network: dict[str, Any] = {}
    if a.num_blocks is not None:
        network["num_blocks"] = a.num_blocks
    if a.attn is not None:
        network["attn_resolutions"] = a.attn
    config = _train_config(a, a.arch, network)
    data = (images, labels) if a.cond else images
    name = Path(a.data).name.removesuffix(".zip")
    desc = f"{name}-{'cond' if a.cond else 'uncond'}-{a.arch}-{a.precond}"
    return _train_common(a, config, data, desc, extra={"data": str(a.data), "num_images": int(len(images))})


def _add_train_molrg(sub) -> None:
    p = _parser(
        sub,
        "train-molrg",
        "Train a diffusion model on a mixture of low-rank Gaussians (the authors' trainMoLRG.py).",
        "torchrun --standalone --nproc_per_node=1 -m nbhelpers train-molrg --outdir training --path datasets "
        "--img_res 4 --class_num 2 --per_class_dim 7 --sample_per_class 350 --embed_channels 128",
    )
    p.add_argument("--outdir", required=True, metavar="DIR", help="where to save the results")
    p.add_argument(
        "--path", required=True, metavar="DIR", help="folder for the MoLRG data set (bases and samples)"
    )
    p.add_argument("--img_res", type=int, default=32, metavar="INT", help="image resolution R (n = 3 R^2)")
    p.add_argument("--img_channels", type=int, default=3, metavar="INT", help="image channels C")
    p.add_argument("--class_num", type=int, default=10, metavar="INT", help="number of subspaces K")
    p.add_argument("--per_class_dim", type=int, default=100, metavar="INT", help="intrinsic dimension d")
    p.add_argument(
        "--sample_per_class", type=int, default=5000, metavar="INT", help="training samples per class"
    )
    p.add_argument("--data_seed", type=int, default=0, metavar="INT", help="seed of the bases and samples")
    p.add_argument(
        "--arch",
        choices=["ddpmpp", "ncsnpp", "adm", "mlp", "lowrank", "param-mlp"],
        default="ddpmpp",
        help="network; lowrank (alias param-mlp) is P2's low-rank parameterised denoiser",
    )
    p.add_argument(
        "--embed_channels", type=int, default=1024, metavar="INT", help="model_channels of the network"
    )
    _add_training_options(
        p, {"precond": "edm", "duration": 6.0, "batch": 512, "augment": 0.0, "snap": 10, "molrg": True}
    )
    p.set_defaults(func=cmd_train_molrg)


def cmd_train_molrg(a: argparse.Namespace) -> int:
    import torch

    from .molrg import LowRankDenoiser, MoLRG

    _check_train_output(a)
    name = (
        f"MoLRG_dataset_resolution{a.img_res}_classnum{a.class_num}_perclassdim{a.per_class_dim}"
        f"_sample{a.sample_per_class}"
    )
    data_file = Path(a.path) / f"{name}_seed{a.data_seed}.npz"
    if data_file.exists():
        mix = MoLRG.load(data_file)
        stored = MoLRG.load_samples(data_file)
        if stored is None:
            raise CLIError(f"{data_file}: holds no samples")
        x, labels = stored
        _print0(f"Loaded MoLRG data set {data_file}")
    else:
        mix = MoLRG.create(a.class_num, a.per_class_dim, a.img_res, a.img_channels, generator=a.data_seed)
        x, labels = mix.sample(a.sample_per_class, generator=torch.Generator().manual_seed(a.data_seed + 1))
        if _rank0() and not a.dry_run:
            mix.save(data_file, samples=x, labels=labels)
            _print0(f"Wrote MoLRG data set {data_file}")
    arch = "lowrank" if a.arch in ("lowrank", "param-mlp") else a.arch
    net = None
    if arch == "lowrank":
        net = LowRankDenoiser(
            a.class_num,
            a.per_class_dim,
            a.img_res,
            a.img_channels,
            generator=torch.Generator().manual_seed(a.seed),
        )
        network: dict[str, Any] = {}
    else:
        network = {"model_channels": a.embed_channels}
        if arch in ("ddpmpp", "ncsnpp"):
            network["channel_mult"] = [2, 2, 2]
    config = _train_config(a, "mlp" if arch == "lowrank" else arch, network)
    data = (x, labels) if a.cond else x
    a.outdir = str(Path(a.outdir) / name)
    return _train_common(
        a,
        config,
        data,
        f"molrg-{'cond' if a.cond else 'uncond'}-{a.arch}-{a.precond}",
        net=net,
        extra={"molrg": str(data_file), "arch": a.arch},
    )


# ----------------------------------------------------------------------------
# jacobian


def _add_jacobian(sub) -> None:
    p = _parser(
        sub,
        "jacobian",
        "Rank of the denoiser's Jacobian vs SNR (the authors' jacobian.py).",
        "nbhelpers jacobian --network_pkl "
        "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl --steps 18",
        "Rank of the denoiser's Jacobian vs SNR (the authors' jacobian.py). Along a sampling trajectory\n"
        "(--trajectory, or --steps as the authors' script): the Jacobian where each step starts. Otherwise\n"
        "on a sigma grid (--sigmas) around clean points that the sampler (same options) generates.",
    )
    p.add_argument("--network_pkl", required=True, metavar="PKL|URL", help="network snapshot")
    p.add_argument(
        "--class", dest="class_idx", type=int, metavar="INT", help="class label (default: random per seed)"
    )
    p.add_argument(
        "--seeds",
        type=_int_list,
        default=_int_list("0-4"),
        metavar="LIST",
        help="starting noise seeds (default 0-4; the authors' script draws one unseeded latent)",
    )
    _add_sampler_options(
        p,
        ablation=False,
        steps_help="sampling steps of the trajectory (default 18); giving it selects --trajectory",
    )
    p.add_argument(
        "--sigmas", type=_float_list, metavar="LIST", help="noise levels; default: the authors' SNR grid"
    )
    p.add_argument(
        "--trajectory", action="store_true", help="evaluate along sampling trajectories (--steps steps)"
    )
    p.add_argument("--ratio", type=float, default=0.99, metavar="FLOAT", help="rank threshold (default 0.99)")
    p.add_argument(
        "--rule", choices=["authors", "energy"], default="authors", help="rank rule (default: the authors')"
    )
    p.add_argument("--chunk", type=int, metavar="INT", help="basis vectors per batched VJP (memory bound)")
    p.add_argument(
        "--out",
        metavar="CSV|JSON",
        help="write the table to this file (after every seed; a rerun continues it)",
    )
    p.add_argument("--overwrite", action="store_true", help="recompute every seed even if --out has it")
    p.add_argument("--device", help="cuda, cpu ... (default: cuda if available)")
    p.set_defaults(func=cmd_jacobian)


def _jacobian_record_path(out: str) -> Path:
    return Path(out).with_name(f".{Path(out).name}.nbhelpers-jacobian.json")


def _previous_jacobian_rows(out: str, record: dict) -> dict[int, Any]:
    """Rows of an earlier run of the same command in ``--out``, per seed (empty if there is none)."""
    import pandas as pd

    path, record_path = Path(out), _jacobian_record_path(out)
    if not path.exists():
        return {}
    try:
        stored = json.loads(record_path.read_text("utf-8")) if record_path.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        stored = None
    if stored != json.loads(json.dumps(record)):
        raise CLIError(
            f"{out}: exists and was not written by this same command (network, sigmas, ratio and rule); "
            "use another --out or pass --overwrite"
        )
    try:
        table = pd.read_json(path, orient="records") if out.endswith(".json") else pd.read_csv(path)
    except (ValueError, OSError) as e:
        raise CLIError(f"{out}: unreadable ({e}); pass --overwrite to recompute it") from None
    if "seed" not in table.columns or "point" not in table.columns:
        raise CLIError(f"{out}: not a rank table; pass --overwrite to recompute it")
    return {int(seed): rows for seed, rows in table.groupby("seed", sort=False)}


def _class_labels(net, seeds: list[int], class_idx: int | None, shape: list[int], device):
    """One-hot labels per seed as ``generate`` picks them (the seed's draw after its latent), or None."""
    import torch

    from .sampling import SeedNoise

    label_dim = int(getattr(net, "label_dim", 0) or 0)
    if class_idx is not None and not 0 <= class_idx < label_dim:
        raise CLIError(f"--class {class_idx}: the network has {label_dim} classes")
    if not label_dim:
        return None
    if class_idx is None:
        noise = SeedNoise(seeds, device=device)
        noise.randn(shape)
        idx = noise.randint(label_dim)
    else:
        idx = torch.full((len(seeds),), class_idx, device=device)
    return torch.eye(label_dim, device=device)[idx]


def cmd_jacobian(a: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from .jacobian import rank_profile
    from .sampling import SeedNoise, edm_sampler

    if a.out:
        check_writable(a.out)
        check_writable(_jacobian_record_path(a.out))
    device = _device(a.device)
    network = resolve(a.network_pkl)
    net = _load_net(str(network), device)
    shape = [int(net.img_channels), int(net.img_resolution), int(net.img_resolution)]
    trajectory = a.trajectory or a.steps is not None
    if trajectory and a.sigmas is not None:
        raise CLIError(
            "--sigmas is for the sigma grid; a trajectory (--trajectory, --steps) sets its own levels"
        )
    sampler = dict(
        num_steps=a.steps or 18,
        sigma_min=0.002 if a.sigma_min is None else a.sigma_min,
        sigma_max=80.0 if a.sigma_max is None else a.sigma_max,
        rho=a.rho,
        S_churn=a.S_churn,
        S_min=a.S_min,
        S_max=a.S_max,
        S_noise=a.S_noise,
    )
    record = dict(
        network_sha256=_sha256(network),
        trajectory=trajectory,
        sigmas=a.sigmas,
        ratio=a.ratio,
        rule=a.rule,
        sampler=sampler,
        class_idx=a.class_idx,
    )
    done = _previous_jacobian_rows(a.out, record) if a.out and not a.overwrite else {}
    if done:
        _print0(f"{a.out}: keeping the rows of {len(set(done) & set(a.seeds))} seeds from an earlier run")
    elif a.out:
        atomic_write_text(_jacobian_record_path(a.out), json.dumps(record, sort_keys=True))
    common = dict(ratio=a.ratio, rule=a.rule, chunk_size=a.chunk, device=device, batch_size=1)
    frames = []
    for point, seed in enumerate(a.seeds):  # one seed at a time, each written as soon as it is done
        if seed in done:
            frames.append(done[seed].assign(point=point))
            continue
        labels = _class_labels(net, [seed], a.class_idx, shape, device)
        if trajectory:
            table = rank_profile(net, seeds=[seed], trajectory=True, class_labels=labels, **sampler, **common)
        else:
            # Clean points: the network's own samples for the seeds (the authors start from generated images).
            noise = SeedNoise([seed], device=device)
            latents = noise.randn(shape)
            with torch.no_grad():
                clean = edm_sampler(net, latents, labels, noise=noise, **sampler).to(torch.float32)
            table = rank_profile(
                net, clean=clean, sigmas=a.sigmas, seeds=[seed], class_labels=labels, **common
            )
        frames.append(table.assign(point=point))
        if a.out:
            _write_table(a.out, pd.concat(frames, ignore_index=True))
    table = pd.concat(frames, ignore_index=True)
    table = table.sort_values(["step", "point", "rule"], kind="stable", ignore_index=True)
    summary = table.groupby("sigma", sort=False).agg(
        snr=("snr", "first"),
        rank_mean=("rank", "mean"),
        rank_ratio_mean=("rank_ratio", "mean"),
        rank_ratio_std=("rank_ratio", "std"),
    )
    print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
    if a.out:
        _write_table(a.out, table)
        print(f"Wrote {a.out}")
    return 0


def _write_table(out: str, table) -> None:
    text = table.to_json(orient="records", indent=1) if out.endswith(".json") else table.to_csv(index=False)
    atomic_write_text(out, text)


# ----------------------------------------------------------------------------
# sscd feature | rpscore | mscore


def _add_sscd(sub) -> None:
    p = sub.add_parser(
        "sscd",
        help="Similarity features and scores (the authors' sscd.py).",
        description="Similarity features and the reproducibility / generalization scores.",
    )
    ss = p.add_subparsers(dest="sscd_cmd", metavar="{feature,rpscore,mscore}")
    ss.required = True
    f = _parser(
        ss,
        "feature",
        "Compute descriptors of a folder/zip of images into an .npz (with seeds/names).",
        "nbhelpers sscd feature --images ./evaluation/ddpm-dim64-n64 --features "
        "./evaluation/sscd-dim64-n64.npz",
    )
    f.add_argument("--images", required=True, metavar="DIR|ZIP", help="images (generated PNGs or a dataset)")
    f.add_argument("--features", required=True, metavar="NPZ", help="output feature file")
    f.add_argument(
        "--backend",
        choices=["sscd", "pixel"],
        default="sscd",
        help="descriptor: sscd (default) or pixel (unit pixel vectors; both compared by cosine)",
    )
    f.add_argument(
        "--model",
        metavar="PATH|URL|NAME",
        help="SSCD TorchScript file, URL or name (default sscd_disc_large; downloaded once into the cache)",
    )
    f.add_argument("--no-download", dest="no_download", action="store_true", help="never download the model")
    f.add_argument("--batch", type=int, default=64, metavar="INT", help="batch size")
    f.add_argument("--device", help="cuda, cpu ... (default: cuda if available)")
    f.set_defaults(func=cmd_sscd_feature)
    for name, help, example in [
        (
            "rpscore",
            "Reproducibility score: fraction of shared seeds whose descriptors have cosine > t.",
            "nbhelpers sscd rpscore --source ./evaluation/sscd-dim128-n64.npz --target "
            "./evaluation/sscd-dim64-n64.npz",
        ),
        (
            "mscore",
            "Generalization score GL = 1 - fraction of samples "
            "whose nearest training descriptor has cosine > t.",
            "nbhelpers sscd mscore --source ./evaluation/sscd-dim128-n64.npz "
            "--target ./evaluation/sscd-training-dataset-synthetic-cifar10-32x32-n64.npz",
        ),
    ]:
        s = _parser(ss, name, help, example)
        s.add_argument("--source", required=True, metavar="NPZ", help="feature file of generated images")
        s.add_argument(
            "--target",
            required=True,
            metavar="NPZ",
            help="feature file of the other model (rpscore) or of the training set (mscore)",
        )
        s.add_argument("--t", type=float, default=0.6, metavar="FLOAT", help="cosine threshold (default 0.6)")
        s.add_argument("--json", action="store_true", help="print a JSON object instead of text")
        s.set_defaults(func=cmd_sscd_rpscore if name == "rpscore" else cmd_sscd_mscore)


def _load_features(path: str):
    from .features import FeatureSet

    return FeatureSet.load(path)


def cmd_sscd_feature(a: argparse.Namespace) -> int:
    from .features import SSCD, extract_features

    check_writable(a.features)

    device = _device(a.device)
    model = None
    if a.backend == "sscd":  # running the command is the request to download the model (once, cached)
        model = SSCD(
            a.model or "sscd_disc_large", device=device, batch_size=a.batch, download=not a.no_download
        )
    elif a.model:
        raise CLIError("--model is for --backend sscd")
    fs = extract_features(a.images, backend=a.backend, model=model, batch_size=a.batch)
    fs.save(a.features)
    print(f"Wrote {len(fs.features)} {a.backend} descriptors ({fs.features.shape[1]}-d) to {a.features}")
    return 0


def _few(values, k: int = 5) -> str:
    values = sorted(values)
    return ", ".join(map(str, values[:k])) + (f", ... ({len(values)} in all)" if len(values) > k else "")


def _check_same_seeds(src, tgt, source: str, target: str) -> None:
    """rpscore pairs samples by seed: both files need the same seeds, each once (errors name the files)."""
    seeds = {}
    for fs, path in ((src, source), (tgt, target)):
        if fs.seeds is None:
            raise CLIError(f"{path}: has no seeds (its image names did not give them); rpscore pairs by seed")
        values = fs.seeds.tolist()
        if len(set(values)) != len(values):
            repeated = {s for s in values if values.count(s) > 1} if len(values) < 10**5 else set()
            raise CLIError(f"{path}: repeated seeds {_few(repeated)}")
        seeds[path] = set(values)
    only_a, only_b = seeds[source] - seeds[target], seeds[target] - seeds[source]
    if only_a or only_b:
        parts = [
            f"only in {source}: {_few(only_a)}" if only_a else "",
            f"only in {target}: {_few(only_b)}" if only_b else "",
        ]
        raise CLIError(
            "the two feature files have different seeds (" + "; ".join(p for p in parts if p) + ")"
        )


def cmd_sscd_rpscore(a: argparse.Namespace) -> int:
    from .scores import reproducibility_score

    src, tgt = _load_features(a.source), _load_features(a.target)
    _check_same_seeds(src, tgt, a.source, a.target)
    rp = reproducibility_score(src, tgt, threshold=a.t)
    if a.json:
        print(json.dumps({"reproducibility_score": rp, "threshold": a.t, "num_pairs": len(src.features)}))
    else:
        print(f"reproducibility score (RP, cosine > {a.t}, {len(src.features)} seed pairs): {rp:.4f}")
    return 0


def cmd_sscd_mscore(a: argparse.Namespace) -> int:
    from .scores import generalization_score

    src, tgt = _load_features(a.source), _load_features(a.target)
    gl = generalization_score(src.features, tgt.features, threshold=a.t)
    if a.json:
        print(
            json.dumps(
                {
                    "generalization_score": gl,
                    "memorized_fraction": 1 - gl,
                    "threshold": a.t,
                    "num_generated": len(src.features),
                    "num_train": len(tgt.features),
                }
            )
        )
    else:
        print(
            f"generalization score (GL, {len(src.features)} samples vs {len(tgt.features)} training images, "
            f"cosine > {a.t} counts as a copy): {gl:.4f}"
        )
        print(f"memorized fraction (1 - GL): {1 - gl:.4f}")
    return 0


# ----------------------------------------------------------------------------
# Entry point.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nbhelpers",
        description=__doc__.split("\n\n")[0],
        epilog="Run 'nbhelpers <command> --help' for the options and an example of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    sub.required = True
    _add_generate(sub)
    _add_dataset(sub)
    _add_train(sub)
    _add_train_molrg(sub)
    _add_sscd(sub)
    _add_jacobian(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 for usage errors and bad inputs)."""
    parser = build_parser()
    a = parser.parse_args(argv)
    prog = f"nbhelpers {a.command}" + (f" {a.sscd_cmd}" if a.command == "sscd" else "")
    try:
        _check_numbers(a)
        return int(a.func(a) or 0)
    except CLIError as e:
        _error(prog, e)
    except OSError as e:  # missing, unwritable, read-only, full: the path is in the message
        _error(prog, e)
    except ValueError as e:  # bad content: corrupt files, mismatched seeds, unsafe pickles ...
        _error(prog, e)
    except Exception as e:
        if not isinstance(e, DownloadError):
            raise
        _error(prog, e)
    return EXIT_USAGE


def _error(prog: str, e: BaseException) -> None:
    """One line on stderr, whatever the exception's message looks like."""
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    print(f"{prog}: error: {text}", file=sys.stderr)


# Options (by dest) that must be positive integers, and float options that must be finite
# (checked after parsing, for every subcommand that has them).
_POSITIVE = (
    "batch",
    "batch_gpu",
    "model_channels",
    "steps",
    "max_images",
    "snap",
    "dump",
    "num_blocks",
    "img_res",
    "img_channels",
    "class_num",
    "per_class_dim",
    "sample_per_class",
    "embed_channels",
    "chunk",
)
_FINITE = (
    "t",
    "lr",
    "lr_rampup",
    "ema",
    "dropout",
    "augment",
    "duration",
    "tick",
    "sigma_min",
    "sigma_max",
    "rho",
    "S_churn",
    "S_min",
    "S_noise",
    "ratio",
)


_OPTION = {
    "model_channels": "--cbase/--model_channels",
    "batch_gpu": "--batch-gpu",
    "max_images": "--max-images",
    "lr_rampup": "--lr-rampup",
}


def _check_numbers(a: argparse.Namespace) -> None:
    for name in _POSITIVE:
        v = getattr(a, name, None)
        if v is not None and v < 1:
            raise CLIError(f"{_OPTION.get(name, '--' + name)} must be a positive integer, got {v}")
    for name in _FINITE:
        v = getattr(a, name, None)
        if v is not None and not math.isfinite(v):
            raise CLIError(f"{_OPTION.get(name, '--' + name)} must be a finite number, got {v}")
    if getattr(a, "S_max", None) is not None and math.isnan(a.S_max):
        raise CLIError("--S_max must be a number, got nan")
    if getattr(a, "cres", None) is not None and (not a.cres or min(a.cres) < 1):
        raise CLIError(f"--cres must be positive channel multipliers, got {a.cres}")


if __name__ == "__main__":
    sys.exit(main())
