"""Bad inputs exit 2 with one line naming the file; scores are never silently wrong; long jobs check
their output first, write as they go and resume (issue 13, parts 2, 5 and 6)."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nbhelpers import networks
from nbhelpers.checkpoints import save_network
from nbhelpers.cli import main
from nbhelpers.features import FeatureSet
from nbhelpers.sampling import export_noise, generate, parse_seeds

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code: int, err: str, *names: str) -> None:
    """Exit 2, no traceback, one error line (progress bars aside) that names ``names``."""
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip() and not re.search(r"\d+%\|", ln)]
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert name in err, (name, err)


@pytest.fixture
def mlp(tmp_path) -> Path:
    """A tiny EDM-preconditioned MLP on 4x4 grey images, saved as an nbhelpers network."""
    net = networks.make_network("mlp", "edm", 4, 1, hidden_dim=8, num_layers=1, emb_dim=4,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    return save_network(net, tmp_path / "mlp.nbh")


def unit(n: int, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.nn.functional.normalize(
        torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1
    )


# ---------------------------------------------------------------- 2. scores are never silently wrong


def test_feature_sets_and_scores_reject_non_finite_values(tmp_path):
    from nbhelpers import scores

    f = unit(6)
    bad = f.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        FeatureSet(bad, seeds=torch.arange(6))
    np.savez(tmp_path / "nan.npz", features=bad.numpy(), seeds=np.arange(6))
    with pytest.raises(ValueError, match="nan.npz.*NaN"):
        FeatureSet.load(tmp_path / "nan.npz")
    inf = f.clone()
    inf[0, 0] = float("inf")
    for call in [
        lambda: scores.generalization_score(f, bad),
        lambda: scores.generalization_score(bad, f),
        lambda: scores.max_similarity(f, inf),
        lambda: scores.reproducibility_score((bad, np.arange(6)), (f, np.arange(6))),
        lambda: scores.nearest_neighbors(bad, f),
        lambda: scores.nn_ratio(f, bad),
        lambda: scores.mean_abs_difference(bad, f),
        lambda: scores.rp_relative((f, np.arange(6)), (inf, np.arange(6))),
    ]:
        with pytest.raises(ValueError, match="NaN or infinite"):
            call()
    for call in [
        lambda: scores.reproducibility_score((f, np.arange(6)), (f, np.arange(6)), threshold=float("nan")),
        lambda: scores.generalization_score(f, f, threshold=float("nan")),
    ]:
        with pytest.raises(ValueError, match="threshold"):
            call()


def test_nan_training_features_do_not_flip_mscore(tmp_path, capsys):
    """One NaN key used to make a 4096-key chunk's maximum NaN, so GL went from 0 to 1 with exit 0."""
    gen = unit(5)
    train = torch.cat([gen, unit(20, seed=1)])  # every sample is a copy: GL = 0
    FeatureSet(gen, seeds=torch.arange(5)).save(tmp_path / "gen.npz")
    np.savez(tmp_path / "train.npz", features=np.where(np.arange(25)[:, None] == 7, np.nan, train.numpy()))
    code, out, err = run(
        capsys, "sscd", "mscore", "--source", tmp_path / "gen.npz", "--target", tmp_path / "train.npz"
    )
    one_line_error(code, err, "train.npz", "NaN")
    np.savez(tmp_path / "allnan.npz", features=np.full((5, 8), np.nan, np.float32), seeds=np.arange(5))
    code, out, err = run(
        capsys, "sscd", "rpscore", "--source", tmp_path / "gen.npz", "--target", tmp_path / "allnan.npz"
    )
    one_line_error(code, err, "allnan.npz")


def test_threshold_nan_is_refused(tmp_path, capsys):
    FeatureSet(unit(4), seeds=torch.arange(4)).save(tmp_path / "a.npz")
    for cmd in ("rpscore", "mscore"):
        code, out, err = run(capsys, "sscd", cmd, "--source", tmp_path / "a.npz",
                             "--target", tmp_path / "a.npz", "--t", "nan", "--json")  # fmt: skip
        one_line_error(code, err, "--t")
        assert "NaN" not in out


def test_seed_mismatch_names_both_files(tmp_path, capsys):
    FeatureSet(unit(4), seeds=torch.arange(4)).save(tmp_path / "model-a.npz")
    FeatureSet(unit(4), seeds=torch.arange(1, 5)).save(tmp_path / "model-b.npz")
    code, _, err = run(
        capsys, "sscd", "rpscore", "--source", tmp_path / "model-a.npz", "--target", tmp_path / "model-b.npz"
    )
    one_line_error(code, err, "model-a.npz", "model-b.npz")


def test_nan_weights_or_noise_give_an_error_not_black_images(tmp_path, capsys, mlp):
    class NaNNet(torch.nn.Module):
        img_channels, img_resolution, label_dim = 1, 4, 0

        def forward(self, x, sigma, labels=None):
            return torch.full_like(x, float("nan"))

    with pytest.raises(ValueError, match="NaN or infinite values for seeds 0, 1"):
        generate(NaNNet(), [0, 1], device="cpu", num_steps=2)
    # NaN noise: a noise file with a NaN is refused when read.
    export_noise([0, 1], (1, 4, 4), tmp_path / "noise.npz")
    with np.load(tmp_path / "noise.npz") as z:
        noise = z["noise"].copy()
    noise[1, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan-noise.npz", seeds=np.arange(2), noise=noise)
    code, _, err = run(capsys, "generate", "--network", mlp, "--outdir", tmp_path / "out", "--seeds", "0-1",
                       "--noise", tmp_path / "nan-noise.npz", "--steps", "2")  # fmt: skip
    one_line_error(code, err, "nan-noise.npz", "NaN")
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.parametrize(
    "seeds, pattern",
    [(np.array([0.0, 1.5]), "integers"), (np.array([0, 0]), "repeated seeds")],
    ids=["float", "dup"],
)
def test_noise_files_with_float_or_repeated_seeds(tmp_path, capsys, mlp, seeds, pattern):
    np.savez(tmp_path / "noise.npz", seeds=seeds, noise=np.zeros((2, 1, 4, 4), np.float32))
    code, _, err = run(capsys, "generate", "--network", mlp, "--outdir", tmp_path / "out", "--seeds", "0",
                       "--noise", tmp_path / "noise.npz", "--steps", "2")  # fmt: skip
    one_line_error(code, err, "noise.npz", pattern)


# -------------------------------------------------------- 5. long jobs: output first, per batch, resumable


def test_generate_checks_the_output_before_loading_anything(tmp_path, capsys):
    (tmp_path / "taken").write_text("a file, not a folder")
    # The network does not even exist: the output is checked first, so the error is about the output.
    code, _, err = run(
        capsys, "generate", "--network", tmp_path / "missing.pkl", "--outdir", tmp_path / "taken"
    )
    one_line_error(code, err, "taken", "not a folder")
    code, _, err = run(capsys, "jacobian", "--network_pkl", tmp_path / "missing.pkl", "--out", tmp_path)
    one_line_error(code, err, str(tmp_path), "folder")


@pytest.mark.parametrize(
    "err_no", [errno.EROFS, errno.ENOSPC, errno.EACCES], ids=["read-only", "full", "denied"]
)
def test_unwritable_output_exits_2_before_compute(tmp_path, capsys, monkeypatch, mlp, err_no):
    import nbhelpers.atomic as atomic

    def refuse(*args, **kwargs):
        raise OSError(err_no, os.strerror(err_no))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", refuse)
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(images / "000000.png")
    for argv, name in [
        (["generate", "--network", tmp_path / "missing.pkl", "--outdir", tmp_path / "out"], "out"),
        (["generate", "--network", tmp_path / "missing.pkl", "--outdir", tmp_path / "o.zip"], "o.zip"),
        (["jacobian", "--network_pkl", tmp_path / "missing.pkl", "--out", tmp_path / "r.csv"], str(tmp_path)),
        (["dataset", "--source", images, "--dest", tmp_path / "ds.zip"], "ds.zip"),
        (
            ["sscd", "feature", "--backend", "pixel", "--images", images, "--features", tmp_path / "f.npz"],
            "f.npz",
        ),
        (["train", "--outdir", tmp_path / "t", "--data", tmp_path / "missing.zip"], "t"),
        (["train-molrg", "--outdir", tmp_path / "m", "--path", tmp_path / "nowhere"], "m"),
    ]:
        code, _, err = run(capsys, *argv)
        one_line_error(code, err, name, os.strerror(err_no))


def test_full_disk_while_writing_names_the_file(tmp_path, capsys, monkeypatch, mlp):
    real = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".tmp-000001.png"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as write() reports it: no file name
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    code, _, err = run(capsys, "generate", "--network", mlp, "--outdir", tmp_path / "out", "--seeds", "0-3",
                       "--batch", "1", "--steps", "2")  # fmt: skip
    one_line_error(code, err, "000001.png", "No space left")
    assert (tmp_path / "out" / "000000.png").is_file()  # the batch before the failure was kept
    assert not list((tmp_path / "out").glob(".tmp-*"))


def test_generate_rerun_keeps_finished_images_and_refuses_other_settings(tmp_path, capsys, monkeypatch, mlp):
    import nbhelpers.sampling as sampling

    full = generate(__import__("nbhelpers.checkpoints").checkpoints.load_network(mlp), range(6), device="cpu",
                    num_steps=3)  # fmt: skip
    calls = []
    real = sampling.edm_sampler

    def counting(net, latents, *args, **kwargs):
        calls.append(len(latents))
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted during the third batch
        return real(net, latents, *args, **kwargs)

    monkeypatch.setattr(sampling, "edm_sampler", counting)
    for out in ("imgs", "imgs.zip"):
        calls.clear()
        argv = ["generate", "--network", mlp, "--outdir", tmp_path / out, "--seeds", "0-5", "--batch", "2",
                "--steps", "3", "--device", "cpu"]  # fmt: skip
        with pytest.raises(KeyboardInterrupt):
            run(capsys, *argv)
        calls.clear()
        monkeypatch.setattr(sampling, "edm_sampler", real)
        code, _, err = run(capsys, *argv)
        assert code == 0, err
        monkeypatch.setattr(sampling, "edm_sampler", counting)
        names = [f"{s:06d}.png" for s in range(6)]
        if out.endswith(".zip"):
            with zipfile.ZipFile(tmp_path / out) as zf:
                got = [np.asarray(Image.open(io.BytesIO(zf.read(n)))) for n in names]
            assert not (tmp_path / ".imgs.zip.partial").exists()
        else:
            got = [np.asarray(Image.open(tmp_path / out / n)) for n in names]
        assert all(np.array_equal(g, full[i, 0].numpy()) for i, g in enumerate(got))
    # Other sampler settings into the same folder: refused, not mixed.
    code, _, err = run(capsys, "generate", "--network", mlp, "--outdir", tmp_path / "imgs", "--seeds", "0-5",
                       "--steps", "4", "--device", "cpu")  # fmt: skip
    one_line_error(code, err, "imgs", "steps")


def test_killed_generate_keeps_its_batches_and_resumes(tmp_path, mlp):
    """kill -9 in the middle of a run: the finished batches stay, and a rerun completes the set."""
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import time, torch
        import nbhelpers.sampling as sampling
        real = sampling.edm_sampler
        def slow(*args, **kwargs):
            time.sleep(0.4)
            return real(*args, **kwargs)
        sampling.edm_sampler = slow
        from nbhelpers.cli import main
        main(["generate", "--network", {str(mlp)!r}, "--outdir", {str(out)!r}, "--seeds", "0-11",
              "--batch", "1", "--steps", "3", "--device", "cpu"])
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )

    def finished() -> list:  # written images, not a write in flight (its .tmp-* also ends in .png)
        return sorted(p for p in out.glob("*.png") if not p.name.startswith("."))

    deadline = time.time() + 120
    while len(finished()) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    kept = finished()
    assert 3 <= len(kept) < 12, kept
    for p in kept:
        np.asarray(Image.open(p))  # every image that is there is a complete PNG
    code = main(["generate", "--network", str(mlp), "--outdir", str(out), "--seeds", "0-11", "--batch", "4",
                 "--steps", "3", "--device", "cpu"])  # fmt: skip
    assert code == 0
    from nbhelpers.checkpoints import load_network

    full = generate(load_network(mlp), range(12), device="cpu", num_steps=3)
    for s in range(12):
        assert np.array_equal(np.asarray(Image.open(out / f"{s:06d}.png")), full[s, 0].numpy())


def test_jacobian_out_is_written_per_seed_and_resumed(tmp_path, capsys, monkeypatch, mlp):
    import nbhelpers.jacobian as jacobian

    out = tmp_path / "rank.csv"
    argv = [
        "jacobian",
        "--network_pkl",
        mlp,
        "--seeds",
        "0-2",
        "--sigmas",
        "0.5,2",
        "--out",
        out,
        "--device",
        "cpu",
    ]
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    first = out.read_text()
    calls = []
    real = jacobian.rank_profile
    monkeypatch.setattr(jacobian, "rank_profile", lambda *a, **k: calls.append(1) or real(*a, **k))
    code, _, err = run(capsys, *argv[:4], "0-3", *argv[5:])
    assert code == 0 and len(calls) == 1, (err, calls)  # only the new seed 3 was computed
    import pandas as pd

    table = pd.read_csv(out)
    assert sorted(table.seed.unique()) == [0, 1, 2, 3] and len(table) == 8
    assert pd.read_csv(io.StringIO(first)).equals(table[table.seed < 3].reset_index(drop=True))
    code, _, err = run(capsys, *argv[:-4], "--ratio", "0.9", "--out", out, "--device", "cpu")
    one_line_error(code, err, "rank.csv", "--overwrite")


# ---------------------------------------------------------------- 6. the table of bad inputs


def test_corrupt_deflate_member_in_a_data_set_zip(tmp_path, capsys):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8), dtype=np.uint8)).save(buf, format="png")
    with zipfile.ZipFile(tmp_path / "ds.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.png", buf.getvalue())
    data = bytearray((tmp_path / "ds.zip").read_bytes())
    start = data.index(b"a.png") + len(b"a.png")  # first bytes of the deflate stream
    data[start : start + 8] = b"\xff" * 8
    (tmp_path / "bad.zip").write_bytes(bytes(data))
    code, _, err = run(capsys, "dataset", "--source", tmp_path / "bad.zip", "--dest", tmp_path / "out.zip")
    one_line_error(code, err, "bad.zip")


def test_png_over_the_pixel_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # an 8x8 image counts as a decompression bomb
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "imgs" / "big.png")
    code, _, err = run(capsys, "dataset", "--source", tmp_path / "imgs", "--dest", tmp_path / "out.zip")
    one_line_error(code, err, "big.png", "too large")


@pytest.mark.parametrize("option", ["--batch", "--cbase"])
def test_train_with_zero_batch_or_width(tmp_path, capsys, option):
    (tmp_path / "ds").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ds" / "a.png")
    code, _, err = run(capsys, "train", "--outdir", tmp_path / "t", "--data", tmp_path / "ds", option, "0",
                       "--device", "cpu")  # fmt: skip
    one_line_error(code, err, option)


def test_cond_with_negative_labels(tmp_path, capsys):
    (tmp_path / "ds").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ds" / name)
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"labels": [["a.png", 0], ["b.png", -1]]}))
    code, _, err = run(capsys, "train", "--outdir", tmp_path / "t", "--data", tmp_path / "ds", "--cond", "1",
                       "--device", "cpu", "--duration", "0.00001", "--batch", "2")  # fmt: skip
    one_line_error(code, err, "dataset.json", "non-negative")


def test_noise_given_as_npy(tmp_path, capsys, mlp):
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 4, 4), np.float32))
    code, _, err = run(capsys, "generate", "--network", mlp, "--outdir", tmp_path / "o", "--seeds", "0",
                       "--noise", tmp_path / "x.npy")  # fmt: skip
    one_line_error(code, err, "x.npy", ".npz")


def test_huge_seed_range_is_refused_without_allocating(tmp_path):
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        from nbhelpers.cli import main
        sys.exit(main(["generate", "--network", {str(tmp_path / "n.pkl")!r},
                       "--outdir", {str(tmp_path / "o")!r}, "--seeds", "0-999999999"]))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "seeds" in proc.stderr
    with pytest.raises(ValueError, match="larger than"):
        parse_seeds(str(2**70))


def test_seed_beyond_int64_in_an_image_name(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "imgs" / f"{2**70}.png")
    code, _, err = run(capsys, "sscd", "feature", "--backend", "pixel", "--images", tmp_path / "imgs",
                       "--features", tmp_path / "f.npz")  # fmt: skip
    one_line_error(code, err, f"{2**70}.png")


def test_empty_feature_file(tmp_path, capsys):
    np.savez(tmp_path / "empty.npz", features=np.zeros((0, 8), np.float32))
    FeatureSet(unit(4), seeds=torch.arange(4)).save(tmp_path / "a.npz")
    for cmd in ("mscore", "rpscore"):
        for src, tgt in (("empty", "a"), ("a", "empty")):
            code, _, err = run(
                capsys, "sscd", cmd, "--source", tmp_path / f"{src}.npz", "--target", tmp_path / f"{tgt}.npz"
            )
            one_line_error(code, err, "empty.npz")


def test_truncated_molrg_npz(tmp_path, capsys):
    from nbhelpers.molrg import MoLRG

    name = "MoLRG_dataset_resolution4_classnum2_perclassdim3_sample8_seed0.npz"
    mix = MoLRG.create(2, 3, 4, 3, generator=0)
    x, labels = mix.sample(8, generator=1)
    mix.save(tmp_path / name, samples=x, labels=labels)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "train-molrg", "--outdir", tmp_path / "t", "--path", tmp_path,
                       "--img_res", "4", "--class_num", "2", "--per_class_dim", "3",
                       "--sample_per_class", "8", "--device", "cpu")  # fmt: skip
    one_line_error(code, err, name)


def test_palette_png_and_cmyk_jpeg_load_as_colours(tmp_path):
    from nbhelpers.data import load_images

    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (200, 30, 10)
    rgb[2:] = (5, 90, 250)
    (tmp_path / "p").mkdir()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p" / "a.png")
    images, _ = load_images(tmp_path / "p")
    assert images.shape == (1, 3, 4, 4) and np.array_equal(images[0].transpose(1, 2, 0), rgb)
    (tmp_path / "c").mkdir()
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c" / "a.jpg", quality=100)
    images, _ = load_images(tmp_path / "c")
    assert images.shape == (1, 3, 4, 4)
    assert np.abs(images[0].transpose(1, 2, 0).astype(int) - rgb).max() < 40
