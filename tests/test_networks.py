"""Tests of nbhelpers.networks / nbhelpers.layers: EDM-identical structure, preconditioning, determinism.

Reference numbers (key digests, parameter counts, outputs) were produced with NVlabs/edm's
training/networks.py on CPU; big networks are only built on the meta device here.
"""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from edm_reference import reference_numbers

from nbhelpers import layers, networks
from nbhelpers.networks import (
    MLP,
    EDMPrecond,
    VEPrecond,
    VPPrecond,
    build_network,
    make_network,
    network_kwargs,
)

SMALL = dict(
    model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0, augment_dim=0
)


def small_net(precond: str = "vp", arch: str = "ddpmpp", seed: int = 0, **overrides) -> torch.nn.Module:
    kwargs = (
        dict(SMALL, **overrides)
        if arch != "mlp"
        else dict(hidden_dim=32, num_layers=2, emb_dim=16, **overrides)
    )
    res = 8 if arch != "mlp" else 4
    return make_network(arch, precond, res, 3, generator=torch.Generator().manual_seed(seed), **kwargs).eval()


def key_digest(net: torch.nn.Module) -> str:
    lines = sorted(f"{k} {list(v.shape)}" for k, v in net.state_dict().items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def n_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------------------------
# Structure: parameter counts and state_dict keys/shapes equal EDM's.

# (arch, precond, resolution, label_dim, overrides) -> (parameter count, sha256 of sorted "key [shape]").
EDM_STRUCTURES = [
    (
        ("ddpmpp", "vp", 32, 0, {}),
        55_733_891,
        "5b64854adf30015fc75adc6c061a84a176303695d0be57736e9ec7344e4f6f6d",
    ),
    (
        ("ncsnpp", "ve", 32, 0, {}),
        56_397_827,
        "ea8d0e56f3c0f15893049ab65d6e0a2ed29fa07e384b612f314272c96d5f6ddb",
    ),
    (
        ("adm", "edm", 64, 1000, dict(augment_dim=0, dropout=0.1)),
        295_899_267,
        "462dae53f27654f3f7f3167272cd08cacea1aa52fa444c18ace4a3e3e682a4ae",
    ),
]


@pytest.mark.parametrize("spec,count,digest", EDM_STRUCTURES, ids=["ddpmpp-vp", "ncsnpp-ve", "adm-in64"])
def test_structure_matches_edm(spec, count, digest):
    arch, precond, res, label_dim, overrides = spec
    with torch.device("meta"):
        net = make_network(arch, precond, res, 3, label_dim, **overrides)
    assert n_params(net) == count
    assert key_digest(net) == digest


def test_cifar_presets_paper_sizes_and_keys():
    with torch.device("meta"):
        ddpmpp = make_network("ddpmpp", "vp", 32, 3)
        ncsnpp = make_network("ncsnpp", "ve", 32, 3)
    # EDM paper, Table 7: DDPM++ 55.73M, NCSN++ 56.40M parameters.
    assert round(n_params(ddpmpp) / 1e6, 2) == 55.73
    assert round(n_params(ncsnpp) / 1e6, 2) == 56.40
    sd = ddpmpp.state_dict()
    shapes = {
        "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1),
        "model.enc.16x16_block0.proj.weight": (256, 256, 1, 1),
        "model.enc.16x16_down.skip.weight": (256, 256, 1, 1),
        "model.enc.16x16_down.skip.resample_filter": (1, 1, 2, 2),
        "model.dec.8x8_in0.norm2.weight": (256,),
        "model.dec.32x32_aux_norm.weight": (256,),
        "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
        "model.map_augment.weight": (128, 9),
        "model.map_layer0.weight": (512, 128),
        "model.map_layer1.bias": (512,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert not any(k.startswith("model.map_noise") for k in sd)  # positional embedding has no state
    assert "model.map_augment.bias" not in sd and "model.map_label.weight" not in sd
    assert "model.enc.32x32_block0.qkv.weight" not in sd  # attention at 16x16 only
    assert ddpmpp.model.enc["16x16_block0"].qkv.weight.shape[0] == 3 * 256

    sd = ncsnpp.state_dict()
    assert tuple(sd["model.map_noise.freqs"].shape) == (128,)  # Fourier frequencies are a buffer
    assert tuple(sd["model.enc.16x16_aux_residual.weight"].shape) == (256, 3, 3, 3)  # from the input image
    assert tuple(sd["model.enc.8x8_aux_residual.weight"].shape) == (256, 256, 3, 3)
    assert tuple(sd["model.enc.16x16_aux_residual.resample_filter"].shape) == (1, 1, 4, 4)
    assert "model.map_noise.freqs" not in dict(ncsnpp.named_parameters())


def test_overrides_reach_the_model():
    with torch.device("meta"):
        net = make_network(
            "ddpmpp", "vp", 32, 3, model_channels=64, channel_mult=[1], num_blocks=1, attn_resolutions=[]
        )
    assert net.model.enc["32x32_conv"].weight.shape[0] == 64
    assert sorted(net.model.enc) == ["32x32_block0", "32x32_conv"]
    assert net.model.enc["32x32_block0"].dropout == 0.13  # EDM train.py default
    # attn_resolutions=[] leaves only the always-on attention of the innermost decoder block.
    assert [k for k in net.state_dict() if "qkv.weight" in k] == ["model.dec.32x32_in0.qkv.weight"]


def test_skip_encoder_decoder_keys():
    net = small_net("edm", encoder_type="skip", decoder_type="skip")
    sd = net.state_dict()
    for key in ["model.enc.4x4_aux_down.resample_filter", "model.enc.4x4_aux_skip.weight",
                "model.dec.4x4_aux_norm.weight", "model.dec.4x4_aux_conv.weight",
                "model.dec.8x8_aux_up.resample_filter", "model.dec.8x8_aux_conv.weight"]:  # fmt: skip
        assert key in sd, key
    assert "model.enc.4x4_aux_down.weight" not in sd


# ----------------------------------------------------------------------------------------------
# Numerics equal EDM: init under the same global seed, and outputs for fixed weights and inputs.

# name -> (precond class, label_dim, model kwargs, EDM numbers: sum |init state|, sum D, sum |D|,
# D[1,2,3,:4]), made by `python tests/edm_reference.py --edm <NVlabs/edm checkout>` (see there).
EDM_OUTPUTS = {
    "song_skip": (
        VPPrecond, 0,
        dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0,
             encoder_type="skip", decoder_type="skip", augment_dim=9),
        (8975.152821481568, 28.472955400124192, 364.6771272402257,
         [-2.599206, -0.514091, 1.644379, 1.051556]),
    ),
    "song_ncsnpp": (
        VEPrecond, 0,
        dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0,
             embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
             resample_filter=[1, 3, 3, 1]),
        (9239.659213385017, -206.0769800040871, 454.1709540691227,
         [-1.758826, 0.820675, -1.051507, -0.509733]),
    ),
    "adm_cond": (
        EDMPrecond, 4,
        dict(model_type="DhariwalUNet", model_channels=64, channel_mult=[1, 2], num_blocks=1,
             attn_resolutions=[4], dropout=0.0, augment_dim=9),
        (53239.67455133032, 13.939011311158538, 151.14943716302514,
         [-0.114275, -0.239358, -0.138895, -0.158946]),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(EDM_OUTPUTS))
def test_matches_edm_reference(name):
    """Our classes give the numbers that NVlabs' classes give (tests/edm_reference.py made the table)."""
    cls, label_dim, kwargs, (init_sum, out_sum, out_abs, out_row) = EDM_OUTPUTS[name]
    # EDM draws its init from the global generator; ours does too when none is given.
    got, out = reference_numbers(
        lambda: cls(8, 3, label_dim, **kwargs), label_dim, bool(kwargs.get("augment_dim"))
    )
    assert got == pytest.approx(init_sum, rel=1e-9)
    assert float(out.sum()) == pytest.approx(out_sum, rel=1e-4, abs=1e-3)
    assert float(out.abs().sum()) == pytest.approx(out_abs, rel=1e-5)
    torch.testing.assert_close(
        out[1, 2, 3, :4], torch.tensor(out_row, dtype=torch.float64), rtol=1e-4, atol=1e-5
    )


# ----------------------------------------------------------------------------------------------
# Attention: qkv interleaved per head; the fused kernel agrees with EDM's float32 softmax.


def test_attention_layout_per_head():
    torch.manual_seed(0)
    block = layers.UNetBlock(8, 8, emb_channels=12, attention=True, num_heads=2, skip_scale=math.sqrt(0.5),
                             init_zero=dict(init_weight=1.0)).eval()  # fmt: skip
    x = torch.randn(2, 8, 4, 4)
    emb = torch.randn(2, 12)
    seen = {}
    block.norm2.register_forward_hook(lambda m, i, o: seen.update(res=i[0]))
    with torch.no_grad():
        out = block(x, emb)
        res = seen["res"]
        qkv = block.qkv(block.norm2(res)).reshape(2, 24, 16)
        c = 4
        heads = []
        for h in range(2):
            base = h * 3 * c  # per head: channel ch of q, k, v sits at base + 3*ch + (0, 1, 2)
            q, k, v = (qkv[:, base + s : base + 3 * c : 3] for s in range(3))
            w = torch.softmax(torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(c), dim=2)
            heads.append(torch.einsum("nqk,nck->ncq", w, v))
        a = torch.cat(heads, dim=1).reshape(2, 8, 4, 4)
        expected = (block.proj(a) + res) * math.sqrt(0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,scale", [((4, 64, 256), 1.0), ((6, 16, 64), 4.0), ((2, 256, 16), 0.5)])
def test_fused_attention_matches_reference(shape, scale):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(shape, generator=g) * scale for _ in range(3))
    ref = layers.attention(q, k, v)  # EDM's own form
    torch.testing.assert_close(_fused_attention(q, k, v), ref, rtol=0, atol=1e-5)


def _fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The same attention through torch's fused kernel, (B, c, L) in and out."""
    q, k, v = (t.transpose(1, 2).to(torch.float32).contiguous() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Preconditioning.

# precond -> sigma -> (c_skip, c_out, c_in, c_noise), worked out by hand from EDM Table 1.
COEFFS = {
    "vp": {0.5: (1.0, -0.5, 0.8944271910, 144.66910562), 2.0: (1.0, -2.0, 0.4472135955, 396.79380178)},
    "ve": {0.5: (1.0, 0.5, 1.0, -1.3862943611), 2.0: (1.0, 2.0, 1.0, 0.0)},
    "edm": {
        0.5: (0.5, 0.3535533906, 1.4142135624, -0.1732867951),
        2.0: (0.0588235294, 0.4850712501, 0.4850712501, 0.1732867951),
    },
}


@pytest.mark.parametrize("precond", sorted(COEFFS))
def test_coefficients_explicit(precond):
    net = small_net(precond)
    for sigma, expected in COEFFS[precond].items():
        got = net.coefficients(torch.tensor([sigma], dtype=torch.float64))
        for g, e in zip(got, expected):
            assert float(g) == pytest.approx(e, rel=1e-8, abs=1e-9)


class _Recorder(torch.nn.Module):
    """Stand-in model: records its inputs and returns a fixed function of them."""

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.x, self.noise_labels, self.class_labels = x, noise_labels, class_labels
        return torch.sin(3 * x) + noise_labels.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize("precond", ["vp", "ve", "edm"])
def test_forward_applies_coefficients(precond):
    net = small_net(precond)
    net.model = _Recorder()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.5, 2.0, 0.5])
    d = net(x, sigma)
    rows = [COEFFS[precond][float(s)] for s in sigma]
    c_skip, c_out, c_in, c_noise = (torch.tensor([r[i] for r in rows]).reshape(3, 1, 1, 1) for i in range(4))
    torch.testing.assert_close(net.model.x, c_in * x)
    torch.testing.assert_close(net.model.noise_labels, c_noise.flatten())
    assert net.model.class_labels is None
    expected = c_skip * x + c_out * (torch.sin(3 * c_in * x) + c_noise)
    torch.testing.assert_close(d, expected, rtol=1e-5, atol=1e-5)
    assert d.dtype == torch.float32


def test_sigma_range_and_round_sigma():
    vp, ve, edm = (small_net(p) for p in ("vp", "ve", "edm"))
    # EDM evaluates sigma(epsilon_t) in float32, where exp(1e-6) - 1 rounds to 2^-20: sigma_min = 2^-10.
    assert vp.sigma_min == 2**-10
    assert vp.sigma_max == pytest.approx(152.16697028, rel=1e-6)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0, float("inf"), 0.5)
    assert (vp.beta_d, vp.beta_min, vp.M, vp.epsilon_t) == (19.9, 0.1, 1000, 1e-5)
    for net in (vp, ve, edm):
        r = net.round_sigma(0.37)
        assert isinstance(r, torch.Tensor) and float(r) == pytest.approx(0.37)
        s = torch.tensor([0.1, 3.0], dtype=torch.float64)
        assert torch.equal(net.round_sigma(s), s)


def test_vp_sigma_inverse():
    vp = small_net("vp")
    t = torch.linspace(1e-5, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(vp.sigma_inv(vp.sigma(t)), t, rtol=1e-9, atol=1e-12)
    s = torch.logspace(-3, 2, 50, dtype=torch.float64)
    torch.testing.assert_close(vp.sigma(vp.sigma_inv(s)), s, rtol=1e-9, atol=0)


@pytest.mark.parametrize("precond", ["vp", "edm"])
def test_sigma_forms_identical(precond):
    net = small_net(precond)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x, torch.full((2,), 0.7))
        forms = [0.7, torch.tensor(0.7), torch.tensor([0.7, 0.7]), torch.full((2, 1, 1, 1), 0.7),
                 torch.tensor(0.7, dtype=torch.float64), torch.tensor([0.7])]  # fmt: skip
        for sigma in forms:
            assert torch.equal(net(x, sigma), ref)
        assert torch.equal(net(x.double(), 0.7), ref)  # float64 input is cast to float32
        assert net(x.double(), 0.7).dtype == torch.float32
    with pytest.raises(ValueError, match="sigma"):
        net(x, torch.ones(3))


def test_class_labels_forms():
    net = small_net("edm", label_dim=5)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        one_hot = net(x, 1.0, torch.eye(5)[[0, 4, 2]])
        assert torch.equal(net(x, 1.0, torch.tensor([0, 4, 2])), one_hot)
        zeros = net(x, 1.0, torch.zeros(3, 5))
        assert torch.equal(net(x, 1.0), zeros)
        assert not torch.equal(one_hot, zeros)


def test_label_dropout_in_training():
    net = small_net("vp", label_dim=5, label_dropout=1.0)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        net.train()
        dropped = net(x, 1.0, torch.eye(5)[[1, 2]])
        net.eval()
        torch.testing.assert_close(dropped, net(x, 1.0, torch.zeros(2, 5)))


def test_dropout_only_in_training():
    net = small_net("vp", dropout=0.5)
    with torch.no_grad():
        for p in net.parameters():  # make the dropped branch matter
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x, 1.0), net(x, 1.0))
        net.train()
        torch.manual_seed(0)
        a = net(x, 1.0)
        b = net(x, 1.0)
    assert not torch.allclose(a, b)


def test_fp16_flag_is_ignored_off_cuda():
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a, b = small_net("edm"), small_net("edm", use_fp16=True)
    with torch.no_grad():
        assert torch.equal(a(x, 1.0), b(x, 1.0))


# ----------------------------------------------------------------------------------------------
# Construction, configs and checkpoints.


def test_generator_init_is_deterministic_and_private():
    state = torch.get_rng_state()
    a, b = small_net("ve", arch="ncsnpp", seed=5), small_net("ve", arch="ncsnpp", seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is untouched
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    c = small_net("ve", arch="ncsnpp", seed=6)
    assert not torch.equal(a.model.map_noise.freqs, c.model.map_noise.freqs)


def test_state_dict_round_trip(tmp_path):
    a, b = small_net("vp", seed=0), small_net("vp", seed=1)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.1)
    path = tmp_path / "net.pt"
    torch.save(a.state_dict(), path)
    b.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a(x, 2.0), b(x, 2.0))


def test_network_kwargs_and_init_kwargs_rebuild():
    cfg = network_kwargs("ncsnpp", "edm", 8, 3, label_dim=2, **SMALL)
    text = json.dumps(cfg)
    assert cfg["class_name"] == "EDMPrecond"
    assert cfg["init_kwargs"]["model_type"] == "SongUNet"
    assert cfg["init_kwargs"]["resample_filter"] == [1, 3, 3, 1]
    net = build_network(json.loads(text), generator=torch.Generator().manual_seed(3))
    kw = net._init_kwargs
    assert kw["img_resolution"] == 8 and kw["label_dim"] == 2 and kw["sigma_data"] == 0.5
    assert kw["embedding_type"] == "fourier" and "generator" not in kw
    json.dumps(kw)  # serialisable
    again = build_network({"class_name": "training.networks.EDMPrecond", "init_kwargs": kw},
                          generator=torch.Generator().manual_seed(3))  # fmt: skip
    for (ka, va), (kb, vb) in zip(net.state_dict().items(), again.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert type(EDMPrecond(**kw)) is EDMPrecond


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch"):
        network_kwargs("unet", "vp", 32, 3)
    with pytest.raises(ValueError, match="precond"):
        network_kwargs("ddpmpp", "karras", 32, 3)
    with pytest.raises(ValueError, match="class_name"):
        build_network({"class_name": "iDDPMPrecond", "init_kwargs": {}})
    with pytest.raises(ValueError, match="model_type"):
        VPPrecond(8, 3, model_type="Transformer")
    with pytest.raises(ValueError, match="embedding_type"):
        networks.SongUNet(8, 3, 3, embedding_type="learned")
    with pytest.raises(ValueError, match="img_resolution"):
        networks.SongUNet(12, 3, 3, channel_mult=[1, 1, 1, 1])


# ----------------------------------------------------------------------------------------------
# MLP denoiser for vector data stored as images, and one full-size forward.


def test_mlp_vector_denoiser():
    net = small_net("edm", arch="mlp")
    assert isinstance(net.model, MLP)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    d = net(x, torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.1)
    assert d.shape == (5, 3, 4, 4) and d.dtype == torch.float32 and torch.isfinite(d).all()
    d.square().sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    # Per-sample independence: a batch equals its samples run one at a time.
    with torch.no_grad():
        full = net(x, 0.5)
        torch.testing.assert_close(net(x[2:3], 0.5), full[2:3], rtol=1e-5, atol=1e-6)
    # It sees the flattened vector: changing one coordinate can change every output coordinate.
    net2 = small_net("edm", arch="mlp", seed=1)
    with torch.no_grad():
        for p in net2.parameters():
            p.add_(0.1)
        y = x.clone()
        y[:, 0, 0, 0] += 1
        assert (net2(y, 0.5) - net2(x, 0.5))[:, 2, 3, 3].abs().min() > 0


@pytest.mark.slow
def test_full_ddpmpp_forward_batch1():
    net = make_network("ddpmpp", "vp", 32, 3, generator=torch.Generator().manual_seed(0)).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        d = net(x, 1.5)
    assert d.shape == (1, 3, 32, 32) and d.dtype == torch.float32 and torch.isfinite(d).all()
    # Output convolution starts near zero (EDM's 1e-5 init), so D(x) ~ c_skip x + c_out * 0.
    torch.testing.assert_close(d, x, rtol=0, atol=0.05)


# ----------------------------------------------------------------------------------------------
# CUDA only (skipped elsewhere): fused attention and float16 execution.

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@cuda
def test_cuda_attention_matches_reference():
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape in [(64, 256, 256), (16, 64, 1024), (256, 128, 64)]:
        q, k, v = (torch.randn(shape, generator=g, device="cuda") for _ in range(3))
        ref = layers.attention(q, k, v)
        torch.testing.assert_close(_fused_attention(q, k, v), ref, rtol=0, atol=1e-5)


@cuda
def test_cuda_matches_cpu_and_fp16():
    cpu = small_net("vp", model_channels=32, attn_resolutions=[8, 4])
    with torch.no_grad():
        for p in cpu.parameters():
            p.add_(0.05)
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # full float32 on the GPU
    try:
        _compare_cuda_cpu(cpu, x)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _compare_cuda_cpu(cpu, x):
    with torch.no_grad():
        ref = cpu(x, 0.8)
        gpu = cpu.to("cuda")
        torch.testing.assert_close(gpu(x.cuda(), 0.8).cpu(), ref, rtol=1e-4, atol=1e-4)
        gpu.use_fp16 = True
        half = gpu(x.cuda(), 0.8)
        assert half.dtype == torch.float32
        torch.testing.assert_close(half.cpu(), ref, rtol=0.05, atol=0.05)
        torch.testing.assert_close(gpu(x.cuda(), 0.8, force_fp32=True).cpu(), ref, rtol=1e-4, atol=1e-4)


def test_mlp_runs_under_bf16_autocast():
    net = make_network("mlp", "edm", 4, 3)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x, torch.ones(4))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
