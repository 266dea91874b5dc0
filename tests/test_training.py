"""Tests of nbhelpers.losses, nbhelpers.augment and nbhelpers.training (tiny models, CPU)."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nbhelpers.augment import EDM_AUGMENT_KWARGS, AugmentPipe, make_augment_pipe
from nbhelpers.losses import EDMLoss, VELoss, VPLoss, make_loss
from nbhelpers.networks import EDMPrecond
from nbhelpers.training import (
    TrainConfig,
    TrainingDivergedError,
    _batch_layout,
    _complete_config,
    _EpochOrder,
    _saves_due,
    _setup_model,
    _update_ema,
    edm_ema_beta,
    find_latest_state,
    learning_rate,
    load_training_state,
    train,
)

TINY_UNET = dict(model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0)
REPO = Path(__file__).resolve().parents[1]


class TinyDenoiser(torch.nn.Module):
    """Stand-in denoiser: EDM preconditioning around a two-layer conv net with dropout.

    Accepts class and augmentation labels like EDM networks (both feed a per-channel bias).
    """

    label_dim = 0
    sigma_min = 0.0
    sigma_max = math.inf

    def __init__(
        self,
        channels: int = 3,
        resolution: int = 4,
        hidden: int = 8,
        dropout: float = 0.0,
        augment_dim: int = 0,
    ):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.img_channels, self.img_resolution, self.dropout = channels, resolution, dropout
        self.conv0 = torch.nn.Conv2d(channels + 1, hidden, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(hidden, channels, 3, padding=1)
        self.aug = torch.nn.Linear(augment_dim, hidden, bias=False) if augment_dim else None
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        n = x.shape[0]
        sigma = (
            torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
            .reshape(-1, 1, 1, 1)
            .expand(n, 1, 1, 1)
        )
        sd = 0.5
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        h = torch.cat([c_in * x, (sigma.log() / 4).expand(n, 1, *x.shape[2:])], dim=1)
        h = self.conv0(h)
        if self.aug is not None and augment_labels is not None:
            h = h + self.aug(augment_labels)[:, :, None, None]
        h = F.dropout(F.silu(h), p=self.dropout, training=self.training)
        return c_skip * x + c_out * self.conv1(h)


def clusters(n: int = 32, seed: int = 0, channels: int = 3, res: int = 4) -> torch.Tensor:
    """Two tight clusters at +-0.5 in model space, (n, C, R, R)."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).reshape(n, 1, 1, 1)
    return 0.5 * sign + 0.05 * torch.randn(n, channels, res, res, generator=g)


def base_config(**kw) -> TrainConfig:
    d = dict(
        arch="ddpmpp", precond="edm", network=dict(TINY_UNET), batch_size=8, total_steps=6, lr=2e-3,
        lr_rampup_kimg=0, ema_beta=0.9, log_every=2,
    )  # fmt: skip
    d.update(kw)
    return TrainConfig(**d)


def run(config: TrainConfig, data, **kw):
    """train() on the CPU (bitwise comparisons), without a progress bar."""
    return train(config, data, device="cpu", progress=False, **kw)


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = state(a), state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ----------------------------------------------------------------------------
# Losses.


def test_edm_sigma_distribution_and_weight(gen):
    loss = EDMLoss()
    ln = loss.sample_sigma(200_000, gen, "cpu").log()
    assert abs(ln.mean().item() + 1.2) < 0.02
    assert abs(ln.std().item() - 1.2) < 0.02
    s = torch.tensor([0.1, 0.5, 3.0])
    assert torch.allclose(loss.weight(s), (s**2 + 0.25) / (s * 0.5) ** 2)


def test_vp_sigma_distribution_and_weight(gen):
    loss = VPLoss()
    sigma = loss.sample_sigma(200_000, gen, "cpu").double()
    # Invert sigma(t): 0.5 beta_d t^2 + beta_min t = ln(1 + sigma^2); t must be U(eps_t, 1).
    t = (-0.1 + (0.01 + 2 * 19.9 * torch.log1p(sigma**2)).sqrt()) / 19.9
    assert t.min() >= 1e-5 - 1e-7 and t.max() <= 1 + 1e-6
    assert abs(t.mean().item() - 0.5) < 0.005
    hist = torch.histc(t, bins=10, min=0, max=1) / t.numel()
    assert torch.allclose(hist, torch.full_like(hist, 0.1), atol=0.005)
    assert torch.allclose(
        loss.sigma(torch.tensor(1.0)), torch.tensor(math.sqrt(math.expm1(0.5 * 19.9 + 0.1)))
    )
    assert torch.allclose(loss.weight(torch.tensor([2.0])), torch.tensor([0.25]))


def test_ve_sigma_distribution(gen):
    ln = VELoss().sample_sigma(200_000, gen, "cpu").log()
    lo, hi = math.log(0.02), math.log(100)
    assert ln.min() >= lo - 1e-5 and ln.max() <= hi + 1e-5
    assert abs(ln.mean().item() - (lo + hi) / 2) < 0.02
    assert abs(ln.std().item() - (hi - lo) / math.sqrt(12)) < 0.02


def test_loss_value_and_determinism():
    net = TinyDenoiser()
    x = clusters(8)
    for name in ("vp", "ve", "edm"):
        loss = make_loss(name)
        a = loss(net, x, None, torch.Generator().manual_seed(5))
        b = loss(net, x, None, torch.Generator().manual_seed(5))
        assert a.shape == x.shape and torch.equal(a, b)
        draws = loss.draw(x.shape, torch.Generator().manual_seed(5), "cpu")
        sigma = draws.sigma.reshape(-1, 1, 1, 1)
        manual = loss.weight(sigma) * (net(x + sigma * draws.noise, sigma) - x) ** 2
        assert torch.allclose(a, manual)
        # Evaluating in slices with sliced draws gives the same per-element loss.
        halves = torch.cat([loss.evaluate(net, x[i : i + 4], None, draws[i : i + 4]) for i in (0, 4)])
        assert torch.allclose(halves, a)
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("ddpm")


# ----------------------------------------------------------------------------
# Augmentation.


def test_augment_labels_and_probabilities(gen):
    pipe = make_augment_pipe(0.5)
    assert make_augment_pipe(0.0) is None
    assert pipe.label_dim == 9
    x = torch.randn(2000, 3, 8, 8, generator=gen)
    y, labels = pipe(x, gen)
    assert y.shape == x.shape and labels.shape == (2000, 9)
    fired = (labels != 0).float().mean(0)
    assert abs(fired[0] - 0.5) < 0.05  # x-flip: always drawn (1e8 multiplier), half of them flip.
    assert abs(fired[1] - 0.25) < 0.05  # y-flip: fires with p, then flips half of the time.
    assert abs(fired[2] - 0.5) < 0.05  # isotropic scale fires with p.
    flipped = labels[:, 0] == 1
    only_x = flipped & (labels[:, 1:] == 0).all(1)
    assert torch.allclose(y[only_x], x[only_x].flip(3), atol=1e-5)
    untouched = (labels == 0).all(1)
    assert torch.allclose(y[untouched], x[untouched], atol=1e-5)


def test_augment_transform_conventions():
    x = torch.randn(2, 3, 6, 6)
    rot = AugmentPipe(rotate_frac=1)
    y, lab = rot.apply(x, {"rotate_frac": torch.tensor([math.pi / 2, math.pi])})
    assert torch.allclose(y[0], torch.rot90(x[0], 1, (1, 2)), atol=1e-5)
    assert torch.allclose(y[1], torch.rot90(x[1], 2, (1, 2)), atol=1e-5)
    assert torch.allclose(lab, torch.tensor([[-1.0, 1.0], [-2.0, 0.0]]), atol=1e-6)
    # A one-pixel shift: integer and fractional translation agree in direction and label.
    one = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    yi, li = AugmentPipe(translate_int=1, translate_int_max=1 / 6).apply(x, {"translate_int": one})
    yf, lf = AugmentPipe(translate_frac=1, translate_frac_std=1 / 6).apply(x, {"translate_frac": one})
    assert torch.equal(yi[0, :, :, 1:], x[0, :, :, :-1]) and torch.equal(yi[1, :, :-1], x[1, :, 1:])
    # They differ only in the border column/row that padding fills (grid_sample repeats the edge).
    assert torch.allclose(yf[0, :, :, 1:], yi[0, :, :, 1:], atol=1e-5)
    assert torch.allclose(yf[1, :, :-1], yi[1, :, :-1], atol=1e-5) and torch.equal(li, lf)
    # 90-degree rotation by blitting matches rot90 too.
    y4, l4 = AugmentPipe(rotate_int=1).apply(x, {"rotate_int": torch.tensor([0, 2])})
    assert torch.equal(y4[0], x[0]) and torch.equal(y4[1], torch.rot90(x[1], 2, (1, 2)))
    assert l4.tolist() == [[0.0, 0.0], [1.0, 1.0]]


def test_augment_identity_at_p0_and_sliced_draws(gen):
    every = dict(EDM_AUGMENT_KWARGS, rotate_int=1, translate_int=1)
    x = torch.randn(6, 3, 8, 8, generator=gen)
    y, labels = AugmentPipe(p=0.0, **every)(x, gen)
    assert labels.shape == (6, 13) and not labels.any()
    assert torch.allclose(y, x, atol=1e-5)
    pipe = AugmentPipe(p=1.0, **every)
    params = pipe.draw(6, gen, "cpu")
    full, lfull = pipe.apply(x, params)
    part, lpart = pipe.apply(x[2:5], {k: v[2:5] for k, v in params.items()})
    assert torch.allclose(full[2:5], part, atol=1e-6) and torch.equal(lfull[2:5], lpart)


# ----------------------------------------------------------------------------
# Schedules and config.


def test_lr_rampup():
    assert learning_rate(1e-3, 0, 10) == 0
    assert learning_rate(1e-3, 5000, 10) == pytest.approx(5e-4)
    assert learning_rate(1e-3, 20000, 10) == 1e-3
    assert learning_rate(2e-3, 0, 0) == 2e-3
    r = run(base_config(lr_rampup_kimg=0.032, total_steps=6, log_every=1), clusters(16))
    assert [h["lr"] for h in r.history] == pytest.approx([0, 2.5e-4 * 2, 1e-3, 1.5e-3, 2e-3, 2e-3], rel=1e-9)


def test_ema_formula():
    # EDM: half-life min(500 kimg, 0.05 * cur_nimg); beta = 0.5 ** (batch / half-life).
    assert edm_ema_beta(512, 0, 500, 0.05) == 0.0
    assert edm_ema_beta(512, 1_000_000, 500, 0.05) == pytest.approx(0.5 ** (512 / 50_000))
    assert edm_ema_beta(512, 100_000_000, 500, 0.05) == pytest.approx(0.5 ** (512 / 500_000))
    assert edm_ema_beta(512, 0, 500, None) == pytest.approx(0.5 ** (512 / 500_000))


def test_ema_update_in_training():
    net = TinyDenoiser()
    init = state(net)
    r = run(base_config(total_steps=1, ema_beta=0.75), clusters(8), net=net)
    for k, v in state(r.ema).items():
        assert torch.allclose(v, 0.75 * init[k] + 0.25 * state(r.net)[k], atol=1e-7)
    # EDM's ramp-up: beta is 0 at the first step, so the EMA equals the net.
    net = TinyDenoiser()
    r = run(base_config(total_steps=1, ema_beta=None, ema_halflife_kimg=500), clusters(8), net=net)
    assert_same(r.ema, r.net)


def test_config_roundtrip_and_validation():
    cfg = base_config(betas=(0.9, 0.99), network=dict(model_channels=32, channel_mult=[1, 2]))
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(duration_kimg=1.0, total_steps=5)
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig()
    with pytest.raises(ValueError, match="precision"):
        base_config(precision="fp8")
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_dict(dict(d, colour="red"))
    assert TrainConfig(duration_kimg=1.0, batch_size=64).num_steps() == 16
    moved = base_config(loss_kwargs={"P_mean": 1.0, "P_std": 1.2})
    assert TrainConfig.from_dict(json.loads(json.dumps(moved.to_dict()))) == moved
    with pytest.raises(ValueError, match="loss_kwargs"):
        base_config(loss_kwargs={"P_meen": 1.0})


def test_loss_kwargs_reach_the_training_loss():
    cfg = _complete_config(base_config(loss_kwargs={"P_mean": 1.5}), torch.zeros(4, 3, 8, 8), None)
    m = _setup_model(cfg, None, torch.device("cpu"))
    assert m.loss_fn.P_mean == 1.5 and m.loss_fn.P_std == 1.2


# ----------------------------------------------------------------------------
# The loop.


def test_epoch_order_visits_every_image_once_per_epoch():
    order = _EpochOrder(10, seed=3, device=torch.device("cpu"))
    stream = torch.cat([order.indices(s * 4, 4) for s in range(10)])  # 40 = four epochs
    for e in range(4):
        assert sorted(stream[10 * e : 10 * (e + 1)].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:20])
    again = _EpochOrder(10, seed=3, device=torch.device("cpu"))
    assert torch.equal(again.indices(12, 25), stream[12:37])  # any window, batch larger than N


def test_batch_layout_covers_the_global_batch_once():
    cfg = base_config(batch_size=24, batch_gpu=4)
    layouts = [_batch_layout(cfg, rank, 3) for rank in range(3)]
    assert [(lay.batch_local, lay.batch_gpu, lay.rounds) for lay in layouts] == [(8, 4, 2)] * 3
    covered = [i for lay in layouts for r in range(lay.rounds) for i in range(24)[lay.round_slice(r)]]
    assert covered == list(range(24))
    with pytest.raises(ValueError, match="not divisible by the world size"):
        _batch_layout(cfg, 0, 5)
    with pytest.raises(ValueError, match="not a multiple of batch_gpu"):
        _batch_layout(base_config(batch_size=24, batch_gpu=5), 0, 1)


def test_saves_fall_due_by_steps_by_kimg_and_at_the_end():
    by_steps = base_config(batch_size=8, snapshot_steps=3, state_dump_steps=2)
    due = [_saves_due(by_steps, s, False) for s in (1, 2, 3, 6)]
    assert due == [(False, False), (False, True), (True, False), (True, True)]
    by_kimg = base_config(batch_size=8, snapshot_kimg=0.02)  # one snapshot per 20 images: steps 3, 5, 8
    assert [s for s in range(1, 9) if _saves_due(by_kimg, s, False)[0]] == [3, 5, 8]
    assert _saves_due(by_kimg, 9, True) == (True, False)  # no dumps unless enabled
    assert _saves_due(base_config(state_dump_steps=100), 9, True) == (True, True)


def test_ema_update_is_a_lerp_of_parameters_and_a_copy_of_buffers():
    net, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        net.weight.fill_(2.0)
        ema.weight.fill_(1.0)
        net.running_mean.fill_(5.0)
    _update_ema(ema, net, beta=0.75)
    assert torch.equal(ema.weight, torch.full((3,), 1.25)) and torch.equal(ema.running_mean, net.running_mean)


def test_setup_model_checks_the_data_against_a_given_net():
    cfg = base_config(img_resolution=8, img_channels=3, label_dim=0)
    m = _setup_model(cfg, TinyDenoiser(resolution=8), torch.device("cpu"))
    assert m.net.training and not m.ema.training and m.scaler is None and m.augment_pipe is None
    with pytest.raises(ValueError, match="net.img_resolution=4 does not match the data"):
        _setup_model(cfg, TinyDenoiser(resolution=4), torch.device("cpu"))


def test_gradient_accumulation_equals_big_batch():
    data = clusters(32)
    runs = []
    for batch_gpu in (16, 4):
        net = TinyDenoiser()
        cfg = base_config(batch_size=16, batch_gpu=batch_gpu, total_steps=1, lr=0.0, log_every=1)
        runs.append(run(cfg, data, net=net))
    a, b = runs
    assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], rel=1e-5)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6)
    # And over several steps with a real network (dropout off): same weights up to float error.
    res = [run(base_config(batch_size=8, batch_gpu=g, total_steps=3), data) for g in (8, 2)]
    assert [h["loss"] for h in res[0].history] == pytest.approx([h["loss"] for h in res[1].history], rel=1e-5)
    for pa, pb in zip(res[0].net.parameters(), res[1].net.parameters()):
        assert torch.allclose(pa, pb, atol=1e-4)  # Adam magnifies float noise in near-zero gradients.


def test_uint8_data_matches_float(gen):
    u8 = torch.randint(0, 256, (16, 3, 4, 4), generator=gen, dtype=torch.uint8)
    a = run(base_config(total_steps=2), u8)
    b = run(base_config(total_steps=2), u8.float() / 127.5 - 1)
    assert_same(a.net, b.net)
    assert a.kimg == pytest.approx(0.016) and a.steps == 2


def test_tiny_run_reduces_loss():
    data = clusters(32)
    cfg = base_config(total_steps=150, batch_size=16, lr=3e-3, log_every=50, ema_beta=0.95)
    loss = EDMLoss()

    def eval_loss(net):
        with torch.no_grad():
            return (
                loss(net.eval(), data.repeat(8, 1, 1, 1), None, torch.Generator().manual_seed(9))
                .mean()
                .item()
            )

    net = TinyDenoiser(hidden=16)
    before = eval_loss(copy.deepcopy(net))
    r = run(cfg, data, net=net)
    assert eval_loss(r.ema) < 0.6 * before
    assert r.history[-1]["loss"] < r.history[0]["loss"]


def test_labels_and_molrg_denoiser(gen):
    from nbhelpers.molrg import LowRankDenoiser, MoLRG

    mix = MoLRG.create(2, 3, 4, 3, generator=0)
    x, y = mix.sample(32, generator=1)
    r = run(base_config(total_steps=2, network=dict(TINY_UNET)), (x, y))
    assert r.net.label_dim == 2 and r.net.model.map_augment is None  # no augmentation: augment_dim 0
    lr_net = LowRankDenoiser(2, 3, 4, 3, generator=2)
    r = run(base_config(total_steps=3, lr=1e-2), x, net=lr_net)
    assert r.net is lr_net and len(r.history) == 2


def test_exact_resume_and_outdir(tmp_path):
    data = clusters(24)
    kw = dict(total_steps=7, state_dump_steps=3, snapshot_steps=4, augment_p=0.5, dropout=0.2)
    kw["network"] = dict(TINY_UNET, dropout=0.2)
    full = run(base_config(**kw), data, outdir=tmp_path / "full")
    # A crash in step 5 (after the dump at step 3), then a resume from the newest dump.
    calls = {"n": 0}

    def crash(module, args, output):
        if isinstance(module, EDMPrecond):
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError("simulated crash")

    handle = torch.nn.modules.module.register_module_forward_hook(crash)
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            run(base_config(**kw), data, outdir=tmp_path / "part")
    finally:
        handle.remove()
    assert find_latest_state(tmp_path / "part").name == "training-state-000000003.pt"
    resumed = run(base_config(**kw), data, outdir=tmp_path / "part", resume="latest")
    assert resumed.steps == 7
    assert full.net.model.map_augment is not None  # augment_p > 0 gives the network augment_dim = 9
    assert_same(resumed.net, full.net)
    assert_same(resumed.ema, full.ema)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]

    out = tmp_path / "full"
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "network-snapshot-0000000032.nbh", "network-snapshot-0000000056.nbh", "stats.jsonl",
        "training-state-000000003.pt",
        "training-state-000000006.pt", "training-state-000000007.pt", "training_options.json",
    ]  # fmt: skip
    opts = TrainConfig.from_dict(json.loads((out / "training_options.json").read_text()))
    assert opts.img_resolution == 4 and opts.img_channels == 3 and opts.label_dim == 0
    lines = [json.loads(s) for s in (out / "stats.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == [2, 4, 6, 7]
    assert {"kimg", "loss", "lr", "images_per_sec"} <= set(lines[0])
    resumed_lines = (tmp_path / "part" / "stats.jsonl").read_text().splitlines()
    assert [json.loads(s)["step"] for s in resumed_lines] == [2, 4, 6, 7]
    st = torch.load(out / "training-state-000000007.pt", weights_only=True)
    assert st["step"] == 7 and "optimizer" in st and "ema" in st
    assert load_training_state(out / "training-state-000000003.pt")["step"] == 3

    from nbhelpers.checkpoints import load_network

    snap = load_network(out / "network-snapshot-0000000056.nbh", device="cpu")
    assert_same(snap, full.ema)
    with pytest.raises(FileNotFoundError):
        run(base_config(**kw), data, outdir=tmp_path / "empty", resume="latest")
    fresh = run(base_config(**dict(kw, total_steps=2)), data, outdir=tmp_path / "empty", resume="auto")
    assert fresh.steps == 2 and fresh.history[0]["step"] == 2


def test_nan_stops_and_keeps_last_good_state(tmp_path):
    net = TinyDenoiser()
    calls = {"n": 0}

    def poison(module, args, output):
        calls["n"] += 1
        return output * float("nan") if calls["n"] > 5 else output

    net.register_forward_hook(poison)
    cfg = base_config(total_steps=20, state_dump_steps=2, log_every=10)
    with pytest.raises(TrainingDivergedError, match="diverged") as info:
        run(cfg, clusters(16), outdir=tmp_path, net=net)
    assert info.value.step == 6
    dumps = sorted(p.name for p in tmp_path.glob("training-state-*.pt"))
    assert dumps == ["training-state-000000002.pt", "training-state-000000004.pt"]
    assert info.value.last_state_dump == tmp_path / dumps[-1]
    good = load_training_state(tmp_path / dumps[-1])
    assert all(torch.isfinite(v).all() for v in good["net"].values())


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, torch, torch.distributed as dist
            sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
            torch.set_num_threads(1)
            from test_training import base_config, clusters, run
            cfg = base_config(batch_size=8, batch_gpu=2, total_steps=3)
            r = run(cfg, clusters(32), outdir={str(tmp_path / "out")!r})
            weights = {{k: v for k, v in r.net.state_dict().items()}}
            torch.save(weights, {str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.pt")
            torch.save([h["loss"] for h in r.history], {str(tmp_path)!r} + f"/loss{{dist.get_rank()}}.pt")
            dist.destroy_process_group()
            """
        )
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    # One process accumulating the same 2 x 4 split sees the same data and noise: same result.
    single = run(base_config(batch_size=8, batch_gpu=2, total_steps=3), clusters(32))
    for k, v in single.net.state_dict().items():
        assert torch.allclose(v, r0[k], atol=1e-4), k  # Adam magnifies float noise near zero.
    losses = torch.load(tmp_path / "loss0.pt", weights_only=True)
    assert losses == pytest.approx([h["loss"] for h in single.history], rel=1e-5)
    assert (tmp_path / "out" / "training_options.json").is_file()
