"""Methods, folding, checkpoint and CLI on the toy policies (daptq_ros.quant.toy)."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from daptq_ros.quant import BudgetError, load_quantized, load_recipe, quantize_policy, save_quantized
from daptq_ros.quant.calibration import run_batches
from daptq_ros.quant.csrc import CSRCOptions, fold_affine, fold_dense, solve
from daptq_ros.quant.engine import EngineOptions
from daptq_ros.quant.fakequant import LayerSpec, make_quant_module, rtn_quantize
from daptq_ros.quant.methods.quantvla import scale_rows
from daptq_ros.quant.toy import ToyVLA, build_toy

FAST = {"calib_frames": 64, "sweep_frames": 32, "min_calib_frames": 32}


@pytest.fixture(scope="session")
def toy_vla():
    torch.set_num_threads(1)
    model, adapter, task = build_toy("vla", train_steps=40)
    return model, adapter, task.batches(64, seed=7)


@pytest.fixture(scope="session")
def toy_conv():
    torch.set_num_threads(1)
    model, adapter, task = build_toy("conv", train_steps=200)
    return model, adapter, task.batches(64, seed=7, noise=False)


def _run(toy, **recipe):
    model, adapter, batches = toy
    m = copy.deepcopy(model)
    return m, quantize_policy(m, adapter, batches, load_recipe({**FAST, **recipe}))


@pytest.fixture(scope="session")
def results(toy_vla):
    out = {}
    for key, recipe in {
        "rtn8": dict(method="rtn", w_bits=8),
        "rtn4": dict(method="rtn", w_bits=4),
        "rtn3": dict(method="rtn", w_bits=3),
        "gptq3": dict(method="gptq", w_bits=3),
        "gptq_b": dict(method="gptq", budget=3.5),
        "daptq_b": dict(method="daptq", budget=3.5),
    }.items():
        out[key] = _run(toy_vla, **recipe)[1]
    return out


def test_drift_ordering(results):
    assert results["rtn8"].drift_loss < 0.2 * results["rtn4"].drift_loss
    assert results["gptq3"].drift_loss <= results["rtn3"].drift_loss
    assert results["daptq_b"].drift_loss <= results["gptq_b"].drift_loss + 1e-12
    for r in results.values():
        assert r.size["quant_bytes"] < r.size["fp32_bytes"]


def test_budget_met_and_unmeetable(toy_vla, results):
    assert results["daptq_b"].avg_bits <= 3.5
    assert results["gptq_b"].avg_bits <= 3.5
    with pytest.raises(BudgetError, match="unmeetable"):
        _run(toy_vla, method="daptq", budget=1.0)
    with pytest.raises(BudgetError):
        _run(toy_vla, method="gptq", budget=1.5)


@pytest.mark.parametrize("method", ["smoothquant", "quantvla", "daptq_paper"])
def test_other_methods_run(toy_vla, method):
    _, r = _run(toy_vla, method=method, w_bits=4)
    assert r.drift_loss > 0 and torch.isfinite(torch.tensor(r.drift_loss))
    if method == "quantvla":
        assert r.layers["action_head.blocks.0.attn.q_proj"].is_float
        assert set(r.extras["atm_alpha"]) == {"action_head.blocks.0.attn", "action_head.blocks.1.attn"}
    if method == "daptq_paper":
        assert r.layers["action_head.blocks.1.mlp.fc1"].is_float  # last 2 blocks protected
        assert not r.layers["trunk.0.attn.q_proj"].is_float
        assert r.sensitivity


def test_qvla_greedy_prunes(toy_vla):
    _, r = _run(
        toy_vla,
        method="qvla",
        budget=3.0,
        method_options={"qvla": {"keep_action_head": False, "keep_interface": False}},
    )
    assert r.avg_bits <= 3.0
    assert r.extras["pruned_channels"] > 0
    assert any(s.channel_bits is not None for s in r.layers.values())


def test_csrc_affine_fold_exact():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    q = make_quant_module(lin, LayerSpec(w_bits=4, a_bits=16), rtn_quantize(lin.weight.detach(), 4))
    x = torch.randn(50, 6)
    g, d = torch.rand(5) + 0.5, torch.randn(5)
    explicit = q(x) * g + d
    fold_affine(q, g.double(), d.double())
    assert torch.allclose(q(x), explicit, atol=1e-5)


def test_csrc_dense_fold_exact_on_float_producer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    x = torch.randn(400, 6)
    z_q = lin(x).detach()
    z_fp = z_q @ (torch.eye(5) + 0.2 * torch.randn(5, 5)).T + 0.3
    mu_fp, mu_q = z_fp.mean(0).double(), z_q.mean(0).double()
    cov = lambda z: torch.cov(z.T.double(), correction=0)  # noqa: E731
    _, A, d = solve(mu_fp, cov(z_fp), mu_q, cov(z_q), CSRCOptions(rank=5, g_min=0.1, g_max=10.0))
    explicit = z_q.double() @ A.T + d
    fold_dense(lin, A, d, EngineOptions(rounding="rtn"), None)
    assert torch.allclose(lin(x).double(), explicit, atol=1e-4)
    assert torch.allclose(lin(x).mean(0).double(), mu_fp, atol=1e-4)  # means matched exactly


def test_quantvla_scalar_fold_matches_explicit_scaling():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 8)
    q = make_quant_module(lin, LayerSpec(w_bits=4, a_bits=16), rtn_quantize(lin.weight.detach(), 4))
    x = torch.randn(3, 8)
    alpha = torch.tensor([1.2, 0.8]).repeat_interleave(4)  # 2 heads of 4 dims
    explicit = q(x) * alpha
    scale_rows(q, alpha)
    assert torch.allclose(q(x), explicit, atol=1e-6)


def test_checkpoint_roundtrip(toy_vla, tmp_path):
    model, r = _run(toy_vla, method="gptq", w_bits=4, symmetric=False, group_size=16)
    path = save_quantized(tmp_path / "q.safetensors", model, r, base={"format": "toy-vla"})
    loaded, info = load_quantized(path, model_factory=lambda base: ToyVLA())
    _, adapter, batches = toy_vla
    a, b = run_batches(model, adapter, batches[:1]), run_batches(loaded, adapter, batches[:1])
    assert torch.equal(a[0], b[0])
    assert info.method == "gptq" and info.layers["trunk.0.attn.q_proj"].w_bits == 4


def test_second_policy_through_adapter(toy_conv):
    _, r8 = _run(toy_conv, method="rtn", w_bits=8)
    _, r = _run(toy_conv, method="daptq", budget=3.5, drift={"jacobian": "cartesian"})
    assert r.avg_bits <= 3.5 and r.drift_loss > r8.drift_loss
    assert r.layers["conv"].group_size == 0


def test_cli_end_to_end(tmp_path, toy_vla):
    from daptq_ros.cli import main

    ckpt = tmp_path / "toy.safetensors"
    save_file({k: v.contiguous() for k, v in toy_vla[0].state_dict().items()}, str(ckpt))
    out = tmp_path / "out"
    rc = main(
        [
            "quantize",
            "--policy",
            "daptq_ros.quant.toy:toy_vla_provider",
            "--checkpoint",
            str(ckpt),
            "--method",
            "rtn",
            "--w-bits",
            "4",
            "--calib-frames",
            "64",
            "--out",
            str(out),
            "--json",
            str(tmp_path / "s.json"),
        ]
    )
    assert rc == 0
    assert (out / "quantized.safetensors").is_file() and (out / "report.md").is_file()
    assert (out / "layers.png").is_file() and (out / "report.json").is_file()
    assert (
        main(
            [
                "quantize",
                "--policy",
                "daptq_ros.quant.toy:toy_vla_provider",
                "--checkpoint",
                str(ckpt),
                "--method",
                "nope",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert (
        main(
            [
                "quantize",
                "--policy",
                "daptq_ros.quant.toy:toy_vla_provider",
                "--checkpoint",
                str(ckpt),
                "--method",
                "daptq",
                "--budget",
                "1.0",
                "--calib-frames",
                "64",
                "--out",
                str(out),
            ]
        )
        == 2
    )


@pytest.mark.parametrize("toy_name", ["toy_conv", "toy_vla"])
def test_daptq_output_bias_correction_removes_the_mean_action_error(toy_name, request):
    toy = request.getfixturevalue(toy_name)
    opts = {"allocation": "uniform", "csrc": False}
    recipe = dict(method="daptq", w_bits=2, rounding="rtn")
    _, plain = _run(toy, **recipe, method_options={"daptq": {**opts, "bias_correction": False}})
    model, fixed = _run(toy, **recipe, method_options={"daptq": opts})
    report = fixed.extras["bias_correction"]
    assert report["applied"] and report["kept"]
    assert fixed.extras["map"] == "uniform"  # the map's origin is reported as what it is
    assert fixed.drift_loss < plain.drift_loss
    before = torch.tensor(report["mean_error_before"]).abs()
    after = torch.tensor(report["mean_error_after"]).abs()
    assert after.max() < 0.5 * before.max()
    # the report describes the model that was returned
    _, adapter, batches = toy
    ref = run_batches(toy[0], adapter, batches)
    got = run_batches(model, adapter, batches)
    err = torch.cat([g - r for g, r in zip(got, ref, strict=True)]).mean(dim=0)
    assert err.abs().max() <= before.max()
