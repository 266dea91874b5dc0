"""nbhelpers.smoke: the smoke profile's assets are made here, in EDM's and SSCD's formats, and cached."""

from __future__ import annotations

import json
import pickletools
import re

import numpy as np
import pytest
import torch

from nbhelpers import profiles, smoke
from nbhelpers.checkpoints import load_network, read_edm_pickle
from nbhelpers.data import image_names, load_images
from nbhelpers.features import SSCD, seeds_from_names
from nbhelpers.sampling import parse_seeds

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smoke_assets")]


@pytest.fixture(scope="module")
def folder():
    """The asset folder the smoke notebooks use (made once; ``make test`` makes it before the suite)."""
    return smoke.ensure_assets()


def test_snapshots_are_edm_pickles(folder):
    for key in ("teacher", "checkpoint_vp"):
        path = folder / smoke.FILES[key]
        ops = [(op.name, arg) for op, arg, _ in pickletools.genops(path.read_bytes())]
        strings = [arg for name, arg in ops if name.endswith("UNICODE")]
        assert "torch_utils.persistence" in strings and "_reconstruct_persistent_obj" in strings
        data = read_edm_pickle(path)
        assert set(data) == {"ema", "loss_fn", "augment_pipe", "dataset_kwargs"}
        assert data["ema"].class_name == {"teacher": "EDMPrecond", "checkpoint_vp": "VPPrecond"}[key]
        assert data["augment_pipe"].class_name == "AugmentPipe" and data["augment_pipe"].state["p"] == 0.12
        net = load_network(path)
        assert (net.img_resolution, net.img_channels, net.model.map_augment is not None) == (8, 3, True)


def test_sscd_stand_in_has_sscd_interface(folder):
    images, _ = load_images(folder / smoke.FILES["images"])
    assert images.shape == (smoke.TEACHER_IMAGES, 3, 8, 8) and images.std() > 10  # not blank
    f = SSCD(folder / smoke.FILES["sscd"], device="cpu", resize=32)(torch.from_numpy(images[:16]))
    assert f.shape == (16, 64) and torch.allclose(f.norm(dim=1), torch.ones(16), atol=1e-5)
    cos = f @ f.T
    assert cos[~torch.eye(16, dtype=torch.bool)].max() < 0.99  # different images, different descriptors


def test_outside_samples_cover_the_smoke_seeds(folder):
    params = profiles.load_profile("model_similarity", "smoke")
    assert params["eval_seeds"] == smoke.OUTSIDE_SEEDS
    for key in ("outside_heun", "outside_euler"):
        seeds = seeds_from_names(image_names(folder / smoke.FILES[key]))
        assert sorted(seeds.tolist()) == parse_seeds(smoke.OUTSIDE_SEEDS)
    heun, _ = load_images(folder / smoke.FILES["outside_heun"])
    euler, _ = load_images(folder / smoke.FILES["outside_euler"])
    assert heun.shape == euler.shape == (16, 3, 8, 8) and not np.array_equal(heun, euler)


def test_every_smoke_yaml_path_names_an_asset(monkeypatch, tmp_path):
    monkeypatch.setenv(smoke.ENV_VAR, str(tmp_path / "assets"))
    used = set()
    for path in sorted((profiles.repo_root() / "params" / "smoke").glob("*.yaml")):
        names = set(re.findall(r"\{smoke_assets\}/([^\"'\s]+)", path.read_text(encoding="utf-8")))
        resolved = json.dumps(profiles.load_profile(path.stem, "smoke"))
        assert "{smoke_assets}" not in resolved
        assert resolved.count(str(tmp_path / "assets")) == len(names)
        used |= names
    assert used and used <= set(smoke.FILES.values())


def test_assets_are_cached_checked_and_deterministic(folder, tmp_path, monkeypatch):
    assert smoke.verify_assets(folder)
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert smoke.ensure_assets(folder) == folder and (folder / "manifest.json").stat().st_mtime_ns == stamp
    copy = smoke.make_assets(tmp_path / "again")
    assert set(copy) == set(json.loads((folder / "manifest.json").read_text())["files"])
    for key in ("teacher", "checkpoint_vp"):
        a, b = (
            load_network(folder / smoke.FILES[key]).state_dict(),
            load_network(tmp_path / "again" / smoke.FILES[key]).state_dict(),
        )
        assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("images", "outside_heun", "outside_euler"):
        assert np.array_equal(
            load_images(folder / smoke.FILES[key])[0], load_images(tmp_path / "again" / smoke.FILES[key])[0]
        )
    # a damaged file is noticed and the folder rebuilt (the rebuild itself is make_assets, run above)
    target = tmp_path / "again" / smoke.FILES["sscd"]
    target.write_bytes(target.read_bytes()[:100])
    assert not smoke.verify_assets(tmp_path / "again")
    rebuilt = []
    monkeypatch.setattr(smoke, "make_assets", rebuilt.append)
    smoke.ensure_assets(tmp_path / "again")
    smoke.ensure_assets(folder)
    assert rebuilt == [tmp_path / "again"]
