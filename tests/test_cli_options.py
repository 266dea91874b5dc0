"""Every option of the authors' scripts is an option of ``nbhelpers``, with the same meaning.

The authors' option lists (tests/data/authors_options.json) were read from their scripts' click
declarations; options that cannot apply here are accepted and say so in their help.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nbhelpers import cli, schedules
from nbhelpers.cli import main

AUTHORS = json.loads((Path(__file__).parent / "data" / "authors_options.json").read_text(encoding="utf-8"))


def _subparser(parser: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("command", [k for k in AUTHORS if not k.startswith("_")])
def test_every_authors_option_is_accepted(command):
    parser = _subparser(cli.build_parser(), command.split())
    ours = {opt: a for a in parser._actions for opt in a.option_strings}
    spec = AUTHORS[command]
    missing = sorted(set(spec["options"]) - set(ours))
    assert not missing, f"nbhelpers {command} lacks {spec['script']}'s {missing}"
    for opt, choices in spec["choices"].items():
        assert set(choices) <= set(ours[opt].choices or ()), (command, opt)
    assert all(ours[o].help for o in spec["options"]), "every option says what it does"


def test_cli_choices_match_the_ablation_sampler():
    assert (cli.DISCRETIZATIONS, cli.SCHEDULES, cli.SCALINGS) == (
        schedules.DISCRETIZATIONS,
        schedules.SCHEDULES,
        schedules.SCALINGS,
    )


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    """A tiny EDM-format snapshot (DDPM++, VP preconditioning) of 3 x 8 x 8 images."""
    from nbhelpers.edm_pickle import write_snapshot
    from nbhelpers.networks import make_network

    g = torch.Generator().manual_seed(0)
    net = make_network("ddpmpp", "vp", 8, 3, model_channels=8, channel_mult=[1], num_blocks=1,
                       attn_resolutions=[], generator=g)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return write_snapshot(tmp_path_factory.mktemp("snap") / "net.pkl", net.eval())


def test_jacobian_steps_class_sigmas_and_churn(snapshot, tmp_path, capsys):
    import pandas as pd

    from nbhelpers.sampling import edm_sigmas

    base = ["jacobian", "--network_pkl", snapshot, "--seeds", "0-1", "--device", "cpu"]
    code, out, err = run(capsys, *base, "--steps", "3", "--out", tmp_path / "t.csv")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "t.csv")  # the trajectory of 3 steps: 3 levels, 2 seeds
    levels = edm_sigmas(3, 0.002, 80.0, 7.0).tolist()[:-1]
    assert len(table) == 6 and np.allclose(sorted(set(table["sigma"]), reverse=True), levels)
    code, _, _ = run(capsys, *base, "--steps", "4", "--sigma_max", "10", "--sigma_min", "0.5", "--rho", "3",
                     "--out", tmp_path / "u.csv")  # fmt: skip
    sig = sorted(set(pd.read_csv(tmp_path / "u.csv")["sigma"]), reverse=True)
    assert code == 0 and np.allclose(sig, edm_sigmas(4, 0.5, 10.0, 3.0).tolist()[:-1])
    churn = ["--S_churn", "40", "--S_min", "0.01", "--S_max", "100", "--S_noise", "1.007"]
    code, _, _ = run(capsys, *base, "--steps", "4", *churn, "--out", tmp_path / "c.csv")
    sig_c = sorted(set(pd.read_csv(tmp_path / "c.csv")["sigma"]), reverse=True)
    assert code == 0 and sig_c[0] > 80.0 * 1.1  # churn raised the first level (gamma = sqrt 2 - 1)
    code, _, err = run(capsys, *base, "--steps", "3", "--class", "1")
    assert code == 2 and "--class" in err  # an unconditional network has no classes
    code, _, err = run(capsys, *base, "--steps", "3", "--sigmas", "1,2")
    assert code == 2 and "--sigmas" in err


def test_generate_ablation_options(snapshot, tmp_path, capsys):
    from nbhelpers.data import load_images

    base = [
        "generate",
        "--network",
        snapshot,
        "--seeds",
        "0-3",
        "--batch",
        "2",
        "--steps",
        "8",
        "--device",
        "cpu",
    ]
    outs = {}
    for name, extra in {
        "default": [],
        "edm": ["--disc", "edm", "--schedule", "linear", "--scaling", "none"],
        "vp": ["--disc", "vp", "--schedule", "vp", "--scaling", "vp"],
        "iddpm": ["--disc", "iddpm", "--solver", "euler"],
        "ve": ["--disc", "ve", "--schedule", "ve", "--sigma_max", "50"],
    }.items():
        code, _, err = run(capsys, *base, "--outdir", tmp_path / name, *extra)
        assert code == 0, err
        outs[name] = load_images(tmp_path / name)[0].astype(int)
    assert np.abs(outs["edm"] - outs["default"]).max() <= 1  # the same sampler, other arithmetic order
    for name in ("vp", "iddpm", "ve"):
        assert not np.array_equal(outs[name], outs["default"]), name


def test_dataset_transform(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    g = np.random.default_rng(0)
    for i, (h, w) in enumerate([(24, 40), (40, 24), (30, 30)]):
        Image.fromarray(g.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(src / f"{i}.png")
    Image.fromarray(g.integers(0, 255, (10, 12), dtype=np.uint8), "L").save(src / "3.png")  # grayscale, small
    from nbhelpers.data import load_images

    code, _, err = run(capsys, "dataset", "--source", src, "--dest", tmp_path / "cc.zip", "--transform",
                       "center-crop", "--resolution", "16x16")  # fmt: skip
    images, _ = load_images(tmp_path / "cc.zip")
    assert code == 0 and images.shape == (4, 3, 16, 16)
    code, _, err = run(capsys, "dataset", "--source", src, "--dest", tmp_path / "w.zip", "--transform",
                       "center-crop-wide", "--resolution", "16x8")  # fmt: skip
    images, _ = load_images(tmp_path / "w.zip")
    # the 12-pixel-wide image is skipped; the others are 16 x 8 bands on a black 16 x 16 square
    assert code == 0 and images.shape == (3, 3, 16, 16)
    assert (images[:, :, :4] == 0).all() and (images[:, :, 12:] == 0).all() and images[:, :, 4:12].any()
    code, _, err = run(
        capsys, "dataset", "--source", src, "--dest", tmp_path / "x.zip", "--transform", "center-crop"
    )
    assert code == 2 and "--resolution" in err
    code, _, err = run(
        capsys, "dataset", "--source", src, "--dest", tmp_path / "y.zip", "--resolution", "16x8"
    )
    assert code == 2 and "square" in err


def test_training_options_are_accepted_with_their_meaning(tmp_path, capsys):
    ds = tmp_path / "ds"
    ds.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ds / "a.png")
    common = ["--outdir", tmp_path / "t", "--data", ds, "--dry-run"]
    code, out, err = run(
        capsys, "train", *common, "--ls", "4", "--bench", "0", "--cache", "0", "--workers", "3"
    )
    assert code == 0, err
    assert '"loss_scaling": 4.0' in out and '"optimizer": "adam"' in out
    code, out, err = run(capsys, "train-molrg", "--outdir", tmp_path / "m", "--path", tmp_path / "d",
                         "--dry-run", "--img_res", "4", "--class_num", "2", "--per_class_dim", "2",
                         "--sample_per_class", "8", "--optimizer", "sgd", "--ls", "2", "--workers", "2",
                         "--bench", "1")  # fmt: skip
    assert code == 0 and '"optimizer": "sgd"' in out and '"loss_scaling": 2.0' in out


@pytest.mark.slow
def test_train_molrg_resumedir_and_sgd(tmp_path, capsys):
    args = ["train-molrg", "--outdir", tmp_path / "training", "--path", tmp_path / "datasets",
            "--img_res", "4", "--class_num", "2", "--per_class_dim", "2", "--sample_per_class", "16",
            "--embed_channels", "8", "--batch", "32", "--tick", "0.064", "--snap", "1", "--dump", "1",
            "--lr-rampup", "0", "--dropout", "0", "--device", "cpu", "--optimizer", "sgd",
            "--resume", "0"]  # fmt: skip
    run_dir = tmp_path / "continue-here"
    code, _, err = run(
        capsys, *args, "--duration", "0.000256", "--resumedir", run_dir
    )  # 8 steps, a fresh start there
    assert code == 0, err
    state = torch.load(sorted(run_dir.glob("training-state-*.pt"))[-1], weights_only=False)
    assert all("exp_avg" not in s for s in state["optimizer"]["state"].values())  # plain SGD, not Adam
    code, _, err = run(
        capsys, *args, "--duration", "0.000512", "--resumedir", run_dir
    )  # continues to 16 steps
    assert code == 0, err
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    steps = [s["step"] for s in stats]
    assert steps == sorted(set(steps)) and steps[-1] == 16  # continued from step 8, not restarted
    assert not (tmp_path / "training").exists() or not any((tmp_path / "training").rglob("stats.jsonl"))


def test_loss_scaling_scales_the_gradient():
    """--ls multiplies the loss before backward: with plain SGD, ls 2 at lr 0.05 is lr 0.1 at ls 1."""
    from nbhelpers.training import TrainConfig, train

    x = torch.randn(32, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    common = dict(arch="mlp", precond="edm", network=dict(hidden_dim=16, num_layers=2, emb_dim=8),
                  total_steps=3, batch_size=16, lr_rampup_kimg=0, ema_beta=0.0, optimizer="sgd")  # fmt: skip
    a = train(
        TrainConfig(lr=0.05, loss_scaling=2.0, **common), x, device="cpu", progress=False
    ).net.state_dict()
    b = train(TrainConfig(lr=0.1, **common), x, device="cpu", progress=False).net.state_dict()
    c = train(TrainConfig(lr=0.05, **common), x, device="cpu", progress=False).net.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(total_steps=1, optimizer="lbfgs")
