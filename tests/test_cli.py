"""The authors' README, command by command, through ``nbhelpers`` at toy scale on CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from nbhelpers.cli import main

pytestmark = pytest.mark.slow


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _blob_images(n: int, res: int = 8, seed: int = 0) -> np.ndarray:
    """Smooth colour blobs, (n, res, res, 3) uint8: a tiny image data set with structure."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res] / (res - 1)
    cy, cx = g.uniform(0.2, 0.8, (2, n, 1, 1))
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.05)
    colour = g.uniform(0, 1, (n, 1, 1, 3))
    return (255 * blob[..., None] * colour).astype(np.uint8)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Source images -> dataset -> two trained models (shared by the tests below)."""
    root = tmp_path_factory.mktemp("cli")
    src = root / "out"
    src.mkdir()
    for i, img in enumerate(_blob_images(24)):
        Image.fromarray(img).save(src / f"{i:06d}.png")
    assert main(["dataset", "--source", str(src), "--max-images", "16", "--dest", str(root / "ds.zip")]) == 0
    common = [
        "--data",
        str(root / "ds.zip"),
        "--cond",
        "0",
        "--arch",
        "ddpmpp",
        "--duration",
        "0.0004",
        "--batch",
        "16",
        "--precond",
        "vp",
        "--model_channels",
        "16",
        "--cres",
        "1",
        "--num_blocks",
        "1",
        "--attn",
        "",
        "--dropout",
        "0",
        "--augment",
        "0",
        "--lr-rampup",
        "0",
        "--tick",
        "0.2",
        "--snap",
        "1",
        "--dump",
        "1",
        "--nosubdir",
        "--device",
        "cpu",
    ]
    for name, seed in [("a", 0), ("b", 1)]:
        assert main(["train", "--outdir", str(root / f"train-{name}"), "--seed", str(seed), *common]) == 0
    return root


def test_readme_chain(chain, capsys):
    root = chain
    snaps = {k: sorted((root / f"train-{k}").glob("network-snapshot-*.nbh"))[-1] for k in "ab"}
    assert (root / "train-a" / "training_options.json").exists()
    assert list((root / "train-a").glob("training-state-*.pt"))
    for k in "ab":
        code, out, _ = run(
            capsys,
            "generate",
            "--outdir",
            root / f"eval-{k}",
            "--seeds",
            "100-107",
            "--batch",
            "3",
            "--steps",
            "6",
            "--network",
            snaps[k],
            "--device",
            "cpu",
        )
        assert code == 0
    names = sorted(p.name for p in (root / "eval-a").glob("*.png"))
    assert names == [f"{s:06d}.png" for s in range(100, 108)]
    code, out, _ = run(
        capsys,
        "generate",
        "--outdir",
        root / "memorization.zip",
        "--seeds",
        "100-107",
        "--batch",
        "4",
        "--steps",
        "6",
        "--optimal_denoiser",
        "--dataset",
        root / "ds.zip",
        "--device",
        "cpu",
        "--export-noise",
        root / "noise.npz",
    )
    assert code == 0 and (root / "memorization.zip").exists() and (root / "noise.npz").exists()

    for name, images in [
        ("a", root / "eval-a"),
        ("b", root / "eval-b"),
        ("opt", root / "memorization.zip"),
        ("train", root / "ds.zip"),
    ]:
        code, out, _ = run(
            capsys,
            "sscd",
            "feature",
            "--backend",
            "pixel",
            "--images",
            images,
            "--features",
            root / f"f-{name}.npz",
        )
        assert code == 0, out
    code, out, _ = run(
        capsys, "sscd", "rpscore", "--source", root / "f-a.npz", "--target", root / "f-b.npz", "--json"
    )
    rp = json.loads(out)
    assert code == 0 and 0 <= rp["reproducibility_score"] <= 1 and rp["num_pairs"] == 8
    code, out, _ = run(
        capsys, "sscd", "rpscore", "--source", root / "f-a.npz", "--target", root / "f-a.npz", "--json"
    )
    assert json.loads(out)["reproducibility_score"] == 1.0  # a model against itself
    # The optimal denoiser copies training images: its samples match the training set (GL = 0).
    code, out, _ = run(
        capsys,
        "sscd",
        "mscore",
        "--source",
        root / "f-opt.npz",
        "--target",
        root / "f-train.npz",
        "--t",
        "0.99",
        "--json",
    )
    ms = json.loads(out)
    assert code == 0 and ms["generalization_score"] == 0.0 and ms["memorized_fraction"] == 1.0
    code, out, _ = run(
        capsys, "sscd", "mscore", "--source", root / "f-a.npz", "--target", root / "f-train.npz"
    )
    assert code == 0 and "generalization score (GL" in out and "memorized fraction (1 - GL)" in out

    code, out, _ = run(
        capsys,
        "jacobian",
        "--network_pkl",
        snaps["a"],
        "--seeds",
        "0-1",
        "--sigmas",
        "0.1,10",
        "--out",
        root / "rank.csv",
        "--device",
        "cpu",
    )
    assert code == 0 and "rank_ratio_mean" in out
    import pandas as pd

    table = pd.read_csv(root / "rank.csv")
    assert len(table) == 4 and set(table["n"]) == {3 * 8 * 8}
    assert table["rank"].between(1, 192).all()


def test_generate_from_exported_noise_matches_seeds(chain, capsys):
    root = chain
    snap = sorted((root / "train-a").glob("network-snapshot-*.nbh"))[-1]
    run(
        capsys,
        "generate",
        "--outdir",
        root / "n1",
        "--seeds",
        "5-7",
        "--steps",
        "4",
        "--network",
        snap,
        "--device",
        "cpu",
        "--export-noise",
        root / "n.npz",
    )
    code, _, _ = run(
        capsys,
        "generate",
        "--outdir",
        root / "n2",
        "--seeds",
        "7,5",
        "--steps",
        "4",
        "--network",
        snap,
        "--device",
        "cpu",
        "--noise",
        root / "n.npz",
    )
    assert code == 0
    for s in (5, 7):
        a = np.asarray(Image.open(root / "n1" / f"{s:06d}.png"))
        b = np.asarray(Image.open(root / "n2" / f"{s:06d}.png"))
        assert np.array_equal(a, b)


def test_train_molrg_and_resume(tmp_path, capsys):
    args = [
        "train-molrg",
        "--outdir",
        tmp_path / "training",
        "--path",
        tmp_path / "datasets",
        "--img_res",
        "4",
        "--class_num",
        "2",
        "--per_class_dim",
        "3",
        "--sample_per_class",
        "16",
        "--embed_channels",
        "8",
        "--duration",
        "0.000256",
        "--batch",
        "32",
        "--tick",
        "0.064",
        "--snap",
        "1",
        "--dump",
        "2",
        "--lr-rampup",
        "0",
        "--dropout",
        "0",
        "--device",
        "cpu",
    ]
    code, out, _ = run(capsys, *args)
    assert code == 0
    data = list(
        (tmp_path / "datasets").glob("MoLRG_dataset_resolution4_classnum2_perclassdim3_sample16*.npz")
    )
    assert len(data) == 1
    (run_dir,) = (
        tmp_path / "training" / "MoLRG_dataset_resolution4_classnum2_perclassdim3_sample16"
    ).iterdir()
    assert run_dir.name.startswith("00000-molrg-uncond-ddpmpp-edm")
    # Resume the newest run for longer: it continues from the last state dump.
    longer = list(args)
    longer[longer.index("--duration") + 1] = "0.000512"
    code, out, _ = run(capsys, *longer, "--resume", "latest")
    assert code == 0
    stats = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert max(s["step"] for s in stats) == 16
    code, out, _ = run(capsys, *args[:-2], "--arch", "lowrank", "--device", "cpu", "--desc", "lr")
    assert code == 0


def test_dry_run_prints_options(tmp_path, capsys):
    ds = tmp_path / "ds"
    ds.mkdir()
    Image.fromarray(_blob_images(1)[0]).save(ds / "a.png")
    code, out, _ = run(
        capsys, "train", "--outdir", tmp_path / "t", "--data", ds, "--model_channels", "64", "--dry-run"
    )
    assert code == 0 and "Dry run" in out and '"model_channels": 64' in out
    assert not (tmp_path / "t").exists()


def test_errors_exit_2_and_name_the_file(tmp_path, capsys):
    code, _, err = run(capsys, "generate", "--outdir", tmp_path / "o", "--network", tmp_path / "missing.pkl")
    assert code == 2 and "missing.pkl" in err
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(b"not a pickle at all")
    code, _, err = run(capsys, "jacobian", "--network_pkl", bad)
    assert code == 2 and "bad.pkl" in err
    code, _, err = run(capsys, "dataset", "--source", tmp_path / "nope", "--dest", tmp_path / "d.zip")
    assert code == 2 and "nope" in err
    from nbhelpers.features import FeatureSet

    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    FeatureSet(features=f, seeds=torch.arange(4)).save(tmp_path / "a.npz")
    FeatureSet(features=f, seeds=torch.arange(1, 5)).save(tmp_path / "b.npz")
    code, _, err = run(
        capsys, "sscd", "rpscore", "--source", tmp_path / "a.npz", "--target", tmp_path / "b.npz"
    )
    assert code == 2 and "seed" in err
    (tmp_path / "c.npz").write_bytes(b"garbage")
    code, _, err = run(
        capsys, "sscd", "mscore", "--source", tmp_path / "c.npz", "--target", tmp_path / "b.npz"
    )
    assert code == 2 and "c.npz" in err
    with pytest.raises(SystemExit) as e:
        main(["train", "--outdir", str(tmp_path)])  # --data missing: argparse's usage error
    assert e.value.code == 2


def test_console_script_help_has_examples():
    for cmd in (
        ["generate"],
        ["dataset"],
        ["train"],
        ["train-molrg"],
        ["sscd", "feature"],
        ["sscd", "rpscore"],
        ["sscd", "mscore"],
        ["jacobian"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "nbhelpers", *cmd, "--help"], capture_output=True, text=True
        )
        assert out.returncode == 0 and "Example:" in out.stdout, cmd


class _TinyDescriptor(torch.nn.Module):
    """A stand-in SSCD: global average pool of a fixed conv, unit-normalised (same interface)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.conv(x).mean(dim=(2, 3)), dim=1)


def test_sscd_feature_with_torchscript_model(tmp_path, capsys):
    torch.manual_seed(0)
    model = tmp_path / "sscd_stand_in.torchscript.pt"
    torch.jit.script(_TinyDescriptor()).save(str(model))
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for s, img in zip([10, 11, 12], _blob_images(3)):
        Image.fromarray(img).save(imgs / f"{s:06d}.png")
    code, out, _ = run(
        capsys,
        "sscd",
        "feature",
        "--images",
        imgs,
        "--features",
        tmp_path / "f.npz",
        "--model",
        model,
        "--device",
        "cpu",
        "--batch",
        "2",
    )
    assert code == 0 and "8-d" in out
    from nbhelpers.features import FeatureSet

    fs = FeatureSet.load(tmp_path / "f.npz")
    assert fs.seeds.tolist() == [10, 11, 12]
    assert torch.allclose(fs.features.norm(dim=1), torch.ones(3), atol=1e-5)
    code, _, err = run(
        capsys,
        "sscd",
        "feature",
        "--images",
        imgs,
        "--features",
        tmp_path / "g.npz",
        "--model",
        "https://example.invalid/sscd.pt",
        "--no-download",
    )
    assert code == 2 and "example.invalid" in err
