"""Benchmark trunks and Linear swapping of daptq_ros.gpu (CPU, tiny shapes; no kernel launches)."""

import pytest
import torch
from torch import nn

from daptq_ros.gpu.linear import (
    VARIANTS,
    FakeQuantActLinear,
    QuantLinear,
    W4A16Linear,
    W8A8Linear,
    quantize_model,
    reference_model,
    weight_nbytes,
)
from daptq_ros.gpu.packing import relative_error
from daptq_ros.gpu.trunk import TrunkConfig, build_trunk, policy_trunk_config, vla_trunk_config

TINY = TrunkConfig(name="tiny", d_model=64, n_layers=2, n_heads=2, ffn=256)


def test_vla_trunk_param_count_is_analytic_and_vla_sized():
    cfg = vla_trunk_config(6)
    d, f = 2048, 8192
    linears = 6 * (3 * d * d + d * d + 2 * d * f)
    assert cfg.linear_param_count() == linears == 301_989_888
    assert cfg.param_count() == linears + 13 * 2 * d
    assert cfg.param_count() >= 300_000_000 and cfg.n_linears() == 24
    assert cfg.name == "trunk-302m"
    big = vla_trunk_config(20)
    assert 0.95e9 < big.param_count() < 1.05e9 and big.name == "trunk-1007m"


def test_param_count_matches_a_built_model():
    split = TrunkConfig(name="t", d_model=32, n_layers=1, n_heads=4, ffn=64, fused_qkv=False, bias=True)
    for cfg in (TINY, split):
        model = build_trunk(cfg, "cpu", torch.float32)
        assert sum(p.numel() for p in model.parameters()) == cfg.param_count()
        assert sum(isinstance(m, nn.Linear) for m in model.modules()) == cfg.n_linears()


def test_policy_trunk_uses_vla_config_shapes():
    cfg = policy_trunk_config()
    try:
        from daptq_ros.model.config import VLAConfig

        vc = VLAConfig()
        assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.ffn) == (
            vc.d_model, vc.trunk_layers, vc.heads, vc.d_model * vc.mlp_ratio)
    except ImportError:
        assert cfg.d_model == 192
    assert not cfg.fused_qkv and cfg.bias
    assert [name for name, _, _ in cfg.linear_shapes()] == ["q", "k", "v", "o", "fc1", "fc2"]


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        TrunkConfig(d_model=100, n_heads=3)
    with pytest.raises(ValueError, match="n_layers"):
        TrunkConfig(n_layers=0)


def test_build_trunk_is_seeded_and_runs():
    a = build_trunk(TINY, "cpu", torch.float32, seed=3)
    b = build_trunk(TINY, "cpu", torch.float32, seed=3)
    x = torch.randn(1, 5, 64)
    assert torch.equal(a(x), b(x))
    assert a(x).shape == (1, 5, 64) and torch.isfinite(a(x)).all()


def test_quantize_model_swaps_eligible_linears_and_keeps_base():
    base = build_trunk(TINY, "cpu", torch.bfloat16)
    model, rep = quantize_model(base, "w4a16_g128")
    assert len(rep.quantized) == TINY.n_linears() and not rep.kept_float
    # K = 64 (qkv, o, fc1) falls back to group 64; K = 256 (fc2) keeps 128
    assert rep.to_dict()["groups_used"] == [64, 128]
    assert rep.groups["blocks.0.fc2"] == 128 and rep.groups["blocks.0.qkv"] == 64
    assert all(type(b.qkv) is nn.Linear and type(b.fc2) is nn.Linear for b in base.blocks)  # base untouched
    assert sum(isinstance(m, W4A16Linear) for m in model.modules()) == TINY.n_linears()
    same, rep_bf16 = quantize_model(base, "bf16")
    assert same is base and not rep_bf16.quantized
    with pytest.raises(ValueError, match="unknown variant"):
        quantize_model(base, "fp8")


def test_quantize_model_keeps_unfit_shapes_float():
    model = nn.Sequential(nn.Linear(4, 64), nn.Linear(64, 4), nn.Linear(64, 64)).to(torch.bfloat16)
    qm, rep = quantize_model(model, "w8a16")
    assert set(rep.kept_float) == {"0", "1"} and rep.quantized == ["2"]
    assert isinstance(qm[0], nn.Linear) and isinstance(qm[2], QuantLinear)


def test_weight_bytes_shrink_with_bits():
    base = build_trunk(TINY, "cpu", torch.bfloat16)
    variants = ("bf16", "w8a16", "w4a16_g64", "w8a8_intmm")
    sizes = {v: weight_nbytes(quantize_model(base, v)[0]) for v in variants}
    lin = TINY.linear_param_count()
    assert sizes["bf16"] == 2 * TINY.param_count()
    assert sizes["w8a16"] < 0.55 * sizes["bf16"] and sizes["w4a16_g64"] < 0.3 * sizes["bf16"]
    # the column-major _int_mm view shares the int8 storage: counted once
    assert sizes["w8a8_intmm"] == pytest.approx(sizes["w8a16"], abs=0.01 * lin)


@pytest.mark.parametrize("variant", ["w8a16", "w4a16_g64", "w8a8_intmm"])
def test_reference_model_computes_the_quantized_function(variant):
    base = build_trunk(TINY, "cpu", torch.bfloat16, seed=1)
    qm, _ = quantize_model(base, variant)
    ref = reference_model(qm)
    assert all(p.dtype == torch.float32 for p in ref.parameters())
    assert not any(isinstance(m, QuantLinear) for m in ref.modules())
    assert any(isinstance(m, FakeQuantActLinear) for m in ref.modules()) == (variant == "w8a8_intmm")
    assert any(isinstance(m, QuantLinear) for m in qm.modules())  # the source model is left intact
    x = torch.randn(1, 7, 64)
    orig = reference_model(base)(x)
    err = relative_error(ref(x), orig)
    assert 0 < err < (0.2 if "w4" in variant else 0.03)


def test_w8a8_module_falls_back_to_torch_ops(monkeypatch):
    lin = nn.Linear(64, 64).to(torch.bfloat16)
    mod = W8A8Linear(lin, use_triton=True)

    def boom(*args, **kwargs):
        if kwargs.get("use_triton"):
            raise RuntimeError("no triton here")
        return real(*args, **kwargs)

    from daptq_ros.gpu import kernels

    real = kernels.w8a8_linear
    monkeypatch.setattr(kernels, "w8a8_linear", boom)
    out = mod(torch.randn(3, 64).to(torch.bfloat16))
    assert out.shape == (3, 64) and not mod.use_triton


def test_variant_names_are_stable():
    assert VARIANTS == ("bf16", "w4a16_g128", "w8a16", "w4a16_g64", "torch_int4_g128", "w8a8_intmm",
                        "w4a16_f16x2_g128", "w4a16_fused_g128")
