"""Tests for nbhelpers.checkpoints: EDM snapshot pickles read safely, and the project's own format."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from nbhelpers import edm_pickle, networks
from nbhelpers.checkpoints import (
    CheckpointError,
    PersistentRecord,
    UnsafeCheckpointError,
    load_network,
    load_snapshot,
    save_network,
)

# Tiny versions of EDM's train.py presets: the init kwargs EDM records for the preconditioner.
TINY_SONG = dict(
    model_type="SongUNet", embedding_type="positional", encoder_type="standard", decoder_type="standard",
    channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2], num_blocks=1,
    attn_resolutions=[4], dropout=0.13, use_fp16=False,
)  # fmt: skip
TINY_NCSN = dict(
    TINY_SONG,
    embedding_type="fourier",
    encoder_type="residual",
    channel_mult_noise=2,
    resample_filter=[1, 3, 3, 1],
)
TINY_ADM = dict(
    model_type="DhariwalUNet", model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4],
    dropout=0.1, use_fp16=False,
)  # fmt: skip

CASES = {
    "vp-ddpmpp": ("VPPrecond", dict(img_resolution=8, img_channels=3, label_dim=0, **TINY_SONG)),
    "ve-ncsnpp-cond": (
        "VEPrecond",
        dict(img_resolution=8, img_channels=3, label_dim=2, augment_dim=9, **TINY_NCSN),
    ),
    "edm-adm-cond": ("EDMPrecond", dict(img_resolution=8, img_channels=1, label_dim=3, **TINY_ADM)),
    "edm-ddpmpp": ("EDMPrecond", dict(img_resolution=8, img_channels=3, label_dim=0, **TINY_SONG)),
}


# ---------------------------------------------------------------- writing EDM-style pickles


@pytest.fixture
def persistence(monkeypatch):
    """A stand-in ``torch_utils.persistence`` whose hook fails when called: the loader must never call it."""
    pkg = types.ModuleType("torch_utils")
    mod = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # what EDM would call; must never be called by the loader
        raise AssertionError("the fake EDM hook was called")

    _reconstruct_persistent_obj.__module__ = mod.__name__
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return mod


def marker_source(marker):
    """Module source whose execution is detectable: it creates ``marker``."""
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('module_src was executed')\n"


# EDM records init args on every persistent object; numpy scalars and arrays occur in them.
_CHILD_INIT_KWARGS = dict(init_weight=np.sqrt(0.2), f=np.ones(2))
_EXTRA_STATE = dict(skip_scale_np=np.float64(np.sqrt(0.5)))


def edm_tree(module, module_src, init_kwargs=None):
    """EDM's pickled structure for ``module`` (nbhelpers.edm_pickle), with numpy values in every record."""
    return edm_pickle.edm_tree(module, module_src, init_kwargs, _CHILD_INIT_KWARGS, _EXTRA_STATE)


def make_source_net(class_name, kwargs, seed=1):
    net = getattr(networks, class_name)(**kwargs, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # move away from the init so equal outputs prove the weights were loaded
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval().requires_grad_(False)


def write_snapshot(path, net, init_kwargs, module_src, protocol=4, **extra):
    tree = dict(init_kwargs=init_kwargs, child_init_kwargs=_CHILD_INIT_KWARGS, extra_state=_EXTRA_STATE)
    extra.setdefault(
        "dataset_kwargs",
        dict(class_name="training.dataset.ImageFolderDataset", path="data.zip", use_labels=False),
    )
    return edm_pickle.write_snapshot(path, net, module_src, protocol=protocol, tree_kwargs=tree, **extra)


def outputs(net, label_dim, channels):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, channels, 8, 8, generator=g)
    sigma = torch.tensor([0.05, 1.0, 30.0])
    labels = torch.eye(label_dim)[torch.tensor([0, 1, 1]) % label_dim] if label_dim else None
    with torch.no_grad():
        return net(x, sigma, labels)


# ---------------------------------------------------------------- tests


def test_marker_source_is_detectable(tmp_path):
    marker = tmp_path / "marker"
    exec(marker_source(marker), {})  # the test's own harmless source: proves the check below can fail
    assert marker.exists()


@pytest.mark.parametrize("case", list(CASES))
def test_edm_snapshot_loads_as_project_network(tmp_path, persistence, case):
    class_name, kwargs = CASES[case]
    src = make_source_net(class_name, kwargs)
    marker = tmp_path / "executed"
    path = write_snapshot(tmp_path / "network-snapshot-000100.pkl", src, kwargs, marker_source(marker))

    net = load_network(path)
    assert not marker.exists()
    assert type(net) is type(src) and not net.training
    assert not any(p.requires_grad for p in net.parameters())
    assert net.sigma_min == src.sigma_min and net.sigma_max == src.sigma_max
    sd, ref = net.state_dict(), src.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    label_dim, channels = kwargs["label_dim"], kwargs["img_channels"]
    assert torch.equal(outputs(net, label_dim, channels), outputs(src, label_dim, channels))


def test_snapshot_entries_are_inert_records(tmp_path, persistence):
    class_name, kwargs = CASES["vp-ddpmpp"]
    marker = tmp_path / "executed"
    path = write_snapshot(
        tmp_path / "snap.pkl", make_source_net(class_name, kwargs), kwargs, marker_source(marker), protocol=2
    )
    data = load_snapshot(path)
    assert isinstance(data["ema"], networks.VPPrecond)
    assert isinstance(data["loss_fn"], PersistentRecord) and data["loss_fn"].class_name == "VPLoss"
    assert data["loss_fn"].state["beta_d"] == 19.9 and "pathlib" in data["loss_fn"].module_src
    assert data["dataset_kwargs"]["path"] == "data.zip" and data["augment_pipe"] is None
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        lambda m: (os.system, (f"touch {m}",)),
        lambda m: (builtins.eval, (f"open({str(m)!r}, 'w')",)),
        lambda m: (builtins.exec, (f"open({str(m)!r}, 'w')",)),
        lambda m: (getattr, ("text", "upper")),
        lambda m: (subprocess.Popen, (["touch", str(m)],)),
    ],
    ids=["os.system", "eval", "exec", "getattr", "subprocess"],
)
def test_refuses_unsafe_globals_and_runs_nothing(tmp_path, persistence, payload):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return payload(marker)

    class_name, kwargs = CASES["vp-ddpmpp"]
    src = make_source_net(class_name, kwargs)
    # Hidden inside an otherwise valid snapshot, after the network.
    path = write_snapshot(tmp_path / "evil.pkl", src, kwargs, marker_source(marker), augment_pipe=Evil())
    with pytest.raises(UnsafeCheckpointError) as err:
        load_network(path)
    func = payload(marker)[0]
    assert "evil.pkl" in str(err.value) and func.__name__ in str(err.value)
    assert not marker.exists()


def test_refuses_unsafe_data_inside_tensor_storage(tmp_path, persistence):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class SneakyStorage:  # EDM tensors rebuild storages from bytes through torch.storage._load_from_bytes
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (pickle.dumps(Evil(), protocol=2),))

    path = tmp_path / "sneaky.pkl"
    path.write_bytes(pickle.dumps(dict(ema=SneakyStorage())))
    with pytest.raises(UnsafeCheckpointError, match="sneaky.pkl"):
        load_network(path)
    assert not marker.exists()


def test_bad_files_give_errors_naming_the_file(tmp_path, persistence):
    class_name, kwargs = CASES["vp-ddpmpp"]
    src = make_source_net(class_name, kwargs)
    good = write_snapshot(tmp_path / "good.pkl", src, kwargs, "").read_bytes()

    (tmp_path / "truncated.pkl").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.pkl").write_text("hello, not a pickle")
    (tmp_path / "empty.pkl").write_bytes(b"")
    (tmp_path / "noema.pkl").write_bytes(pickle.dumps(dict(loss_fn=None)))
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2]))
    for name, pattern in [
        ("truncated.pkl", "truncated"),
        ("text.pkl", "neither"),
        ("empty.pkl", "empty"),
        ("noema.pkl", "no 'ema'"),
        ("list.pkl", "expected a dict"),
    ]:
        with pytest.raises(CheckpointError, match=pattern) as err:
            load_network(tmp_path / name)
        assert name in str(err.value)
    with pytest.raises(FileNotFoundError, match="missing.pkl"):
        load_network(tmp_path / "missing.pkl")


def test_unknown_class_and_wrong_weights(tmp_path, persistence):
    class_name, kwargs = CASES["vp-ddpmpp"]
    tree = edm_tree(make_source_net(class_name, kwargs), "", kwargs)
    tree.meta["class_name"] = "iDDPMPrecond"
    (tmp_path / "iddpm.pkl").write_bytes(edm_pickle.dumps(dict(ema=tree)))
    with pytest.raises(CheckpointError, match="iDDPMPrecond") as err:
        load_network(tmp_path / "iddpm.pkl")
    assert "iddpm.pkl" in str(err.value)

    # Recorded kwargs that disagree with the stored weights: strict loading catches it.
    tree.meta["class_name"] = class_name
    tree.meta["state"]["_init_kwargs"] = dict(kwargs, model_channels=8)
    (tmp_path / "mismatch.pkl").write_bytes(edm_pickle.dumps(dict(ema=tree)))
    with pytest.raises(CheckpointError, match="mismatch.pkl"):
        load_network(tmp_path / "mismatch.pkl")


def test_own_format_round_trip_and_content_detection(tmp_path, persistence, monkeypatch):
    class_name, kwargs = CASES["ve-ncsnpp-cond"]
    src = make_source_net(class_name, kwargs)
    # Named .pkl on purpose: the format is detected from the content.
    path = save_network(src, tmp_path / "net.pkl")
    net = load_network(path)
    assert type(net) is type(src) and net._init_kwargs == src._init_kwargs and not net.training
    sd, ref = net.state_dict(), src.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert torch.equal(outputs(net, 2, 3), outputs(src, 2, 3))
    assert not list(tmp_path.glob(".tmp-*"))

    # An EDM pickle named .zip is still read as a pickle; URLs go through the download cache.
    edm = write_snapshot(tmp_path / "snapshot.zip", src, kwargs, "")
    assert torch.equal(outputs(load_network(edm), 2, 3), outputs(src, 2, 3))
    monkeypatch.setenv("NBHELPERS_CACHE", str(tmp_path / "cache"))
    assert torch.equal(outputs(load_network(edm.as_uri()), 2, 3), outputs(src, 2, 3))
    assert len([p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")]) == 1

    # Broken own-format files.
    data = path.read_bytes()
    (tmp_path / "cut.zip").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.zip"):
        load_network(tmp_path / "cut.zip")
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="plain.pt.*config.json"):
        load_network(tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="save_network"):
        save_network(torch.nn.Linear(2, 2), tmp_path / "linear.zip")


def test_own_format_mlp_and_device(tmp_path):
    net = networks.make_network(
        "mlp", "edm", 2, 2, hidden_dim=16, num_layers=2, emb_dim=8, generator=torch.Generator().manual_seed(0)
    )
    path = save_network(net, tmp_path / "mlp.zip")
    loaded = load_network(path, device="cpu")
    x = torch.randn(4, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x, 0.7), net.eval()(x, 0.7))


def test_lowrank_denoiser_round_trip(tmp_path):
    from nbhelpers.checkpoints import load_network, save_network
    from nbhelpers.molrg import LowRankDenoiser

    net = LowRankDenoiser(2, 3, 4, 3, generator=torch.Generator().manual_seed(5))
    path = save_network(net, tmp_path / "lowrank.nbh")
    back = load_network(path)
    assert type(back) is LowRankDenoiser and torch.equal(back.U, net.U)
    x = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(back(x, 0.5), net(x, 0.5))
