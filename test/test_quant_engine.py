"""Unit tests of the quantization engine: grids, GPTQ, activations, drift loss, budget, config."""

import pytest
import torch

from daptq_ros.config_util import ConfigError
from daptq_ros.quant.budget import avg_bits, layer_bits
from daptq_ros.quant.calibration import ActObserver, CalibrationError, prepare_batches
from daptq_ros.quant.drift_loss import DriftOptions, damped_pinv, dimension_weights, virtual_chain_jacobian
from daptq_ros.quant.fakequant import LayerSpec, QuantLinear, make_quant_module, rtn_quantize
from daptq_ros.quant.gptq import GPTQOptions, gptq_quantize, layer_output_error
from daptq_ros.quant.methods.daptq import knapsack
from daptq_ros.quant.recipe import load_recipe
from daptq_ros.quant.registry import UnknownMethodError, available_methods, get_method


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [0, 16])
def test_grid_levels_and_roundtrip(bits, symmetric, group):
    w = torch.randn(6, 40)
    qw = rtn_quantize(w, bits, group, symmetric)
    assert qw.scale.shape == (6, 1 if group == 0 else 3)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert int(qw.q.min()) >= lo and int(qw.q.max()) <= hi
    deq = qw.dequantize()
    # every value lies on its row/group grid and the error is at most half a step
    step = qw.scale.repeat_interleave(group or 40, dim=1)[:, :40]
    assert torch.all((w - deq).abs() <= step / 2 + 1e-6)
    if symmetric:
        assert qw.zero is None
    else:
        assert qw.zero is not None and qw.zero.dtype == torch.int8


def test_two_bit_symmetric_levels():
    w = torch.tensor([[1.0, 0.5, 0.0, -0.5, -1.0]])
    qw = rtn_quantize(w, 2)
    assert set(qw.q.flatten().tolist()) <= {-2, -1, 0, 1}
    # scale = absmax / qmax = 1; ±0.5 round half to even (as ONNX QuantizeLinear does)
    assert torch.allclose(qw.dequantize(), torch.tensor([[1.0, 0.0, 0.0, 0.0, -1.0]]))


def test_zero_bit_rows_pruned_bias_kept():
    lin = torch.nn.Linear(8, 3)
    spec = LayerSpec(w_bits=4, channel_bits=[4, 0, 2], a_bits=16)
    qw = rtn_quantize(lin.weight.detach(), 4, channel_bits=spec.channel_bits)
    q = make_quant_module(lin, spec, qw)
    y = q(torch.randn(5, 8))
    assert torch.all(q.weight[1] == 0)
    assert torch.allclose(y[:, 1], lin.bias[1].expand(5))
    assert set(q.weight_int[2].tolist()) <= {-2, -1, 0, 1}


def test_fake_quant_forward_is_exact_dequant():
    lin = torch.nn.Linear(16, 4)
    spec = LayerSpec(w_bits=4, group_size=8, symmetric=False, a_bits=8)
    q = make_quant_module(lin, spec, rtn_quantize(lin.weight.detach(), 4, 8, False))
    q.input_scale.fill_(0.02)
    x = torch.randn(3, 16)
    w = (
        q.weight_int.float() - q.weight_zero.float().repeat_interleave(8, 1)
    ) * q.weight_scale.repeat_interleave(8, 1)
    xq = torch.clamp(torch.round(x / 0.02), -128, 127) * 0.02
    assert torch.allclose(q(x), xq @ w.T + lin.bias, atol=1e-6)


def _correlated_inputs(n=2048, d=64):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, 8, generator=g)
    return base @ torch.randn(8, d, generator=g) + 0.1 * torch.randn(n, d, generator=g)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_layer_output(bits, act_order):
    x = _correlated_inputs()
    H = 2 * x.T @ x / len(x)
    w = torch.randn(32, 64)
    rtn = rtn_quantize(w, bits)
    gq = gptq_quantize(w, H, bits, options=GPTQOptions(act_order=act_order))
    e_rtn, e_gptq = layer_output_error(w, rtn.dequantize(), H), layer_output_error(w, gq.dequantize(), H)
    assert e_gptq < 0.7 * e_rtn
    assert int(gq.q.abs().max()) <= 2 ** (bits - 1)


def test_gptq_groups_lazy_and_static():
    x = _correlated_inputs()
    H = 2 * x.T @ x / len(x)
    w = torch.randn(16, 64)
    for act_order in (False, True):
        gq = gptq_quantize(w, H, 4, group_size=16, options=GPTQOptions(act_order=act_order))
        assert gq.scale.shape == (16, 4)
        assert layer_output_error(w, gq.dequantize(), H) < layer_output_error(
            w, rtn_quantize(w, 4, 16).dequantize(), H
        )


def test_activation_scales():
    obs = ActObserver()
    x = torch.randn(10000)
    x[0] = 100.0  # one outlier
    obs("l", None, x)
    assert obs.scale("l", "minmax") == pytest.approx(100.0 / 127)
    assert obs.scale("l", "percentile", 99.0) < 4.0 / 127
    mse = obs.scale("l", "mse")
    assert mse < 100.0 / 127 / 4


def test_virtual_chain_jacobian_and_weights():
    q = torch.zeros(1, 7)
    J = virtual_chain_jacobian(q)[0]
    # θ = 0: J_x = 0, J_y^(j) = number of terms k=j..6, last column has no translation
    assert torch.allclose(J[1], torch.tensor([6.0, 5, 4, 3, 2, 1, 0]))
    assert torch.all(J[0] == 0) and torch.all(J[2] == 1)
    Jp = damped_pinv(J[None], 3e-4)[0]
    assert Jp.shape == (7, 3)
    s = dimension_weights(torch.randn(100, 7) * 0.1, DriftOptions())
    assert s.mean().item() == pytest.approx(1.0, abs=1e-5)
    s4 = dimension_weights(
        torch.zeros(10, 4), DriftOptions(jacobian="joint", jacobian_matrix=[[1, 0, 0, 0]] * 3)
    )
    assert s4.argmax().item() == 0


def test_budget_accounting():
    shapes = {"a": (64, 256), "b": (32, 64)}
    plan = {"a": LayerSpec(w_bits=4), "b": LayerSpec(w_bits=16)}
    expect = (64 * (4 * 256 + 16) + 16 * 32 * 64) / (64 * 256 + 32 * 64)
    assert avg_bits(plan, shapes) == pytest.approx(expect)
    assert layer_bits(LayerSpec(w_bits=4, channel_bits=[0] * 64), shapes["a"]) == 0


def test_knapsack_exact_small():
    costs = {"a": {2: 2.0, 8: 8.0}, "b": {2: 2.0, 8: 8.0}}
    values = {"a": {2: 10.0, 8: 0.0}, "b": {2: 1.0, 8: 0.0}}
    assert knapsack(costs, values, 10.0, 1000) == {"a": 8, "b": 2}


def test_recipe_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="bogus"):
        load_recipe({"bogus": 1})
    with pytest.raises(ConfigError, match="method"):
        load_recipe({"method": "nope"})
    with pytest.raises(ConfigError, match=r"method_options\.daptq\.wrong"):
        load_recipe({"method_options": {"daptq": {"wrong": 1}}})
    with pytest.raises(ConfigError, match="gptq"):
        load_recipe({"gptq": {"damp": 5.0}})
    with pytest.raises(ConfigError, match="w_bits"):
        load_recipe({"w_bits": 5})
    assert load_recipe("config/quantize.yaml").method == "daptq"


def test_registry():
    assert {"rtn", "gptq", "smoothquant", "qvla", "quantvla", "daptq_paper", "daptq"} <= set(
        available_methods()
    )
    with pytest.raises(UnknownMethodError, match=r"available: .*rtn"):
        get_method("nope")


def test_calibration_too_small():
    with pytest.raises(CalibrationError, match="too small"):
        prepare_batches([{"x": torch.zeros(4, 2)}], 256, 32)


def test_quantlinear_shape():
    q = QuantLinear(8, 4, True, LayerSpec(w_bits=4, group_size=0))
    assert q.weight_scale.shape == (4, 1) and q.input_scale is not None
