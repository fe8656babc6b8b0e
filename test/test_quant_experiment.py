"""daptq experiment: statistics/table functions on fabricated inputs, recipe hashing/caching, the
forward cache, and a tiny end-to-end run (tiny checkpoint, 1 task, 1 short episode)."""

import copy
import json
import math

import pytest
import torch
import yaml

from daptq_ros.quant import forward_cache
from daptq_ros.quant.experiment_report import (
    average_ranks,
    correlations,
    format_correlations,
    format_table,
    format_task_table,
    mcnemar_exact,
    recipe_hash,
    spearman,
    target_checks,
)


# ----------------------------------------------------------------------------- statistics
def test_average_ranks_with_ties():
    assert average_ranks([10, 20, 20, 30]) == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([3, 3, 3]) == [2.0, 2.0, 2.0]
    assert average_ranks([]) == []


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: ranks x = [1, 2.5, 2.5, 4], y = [1, 2, 3, 4] -> Pearson of ranks = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5.0))
    # ties on both sides: ranks [1, 3.5, 3.5, 2, 5] and [5, 1.5, 3, 4, 1.5] -> -8.75 / 9.5
    # (= scipy.stats.spearmanr(...).statistic, -0.92105...)
    assert spearman([0.1, 0.4, 0.4, 0.2, 0.9], [0.9, 0.5, 0.6, 0.8, 0.5]) == pytest.approx(-8.75 / 9.5)
    assert spearman([1, 2], [2, 1]) is None  # too few
    assert spearman([1, 1, 1], [1, 2, 3]) is None  # constant side
    with pytest.raises(ValueError):
        spearman([1, 2, 3], [1, 2])


def test_mcnemar_exact():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)  # 2 * 0.5^5
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(1, 6) == pytest.approx(2 * (1 + 7) / 128)


def test_recipe_hash_is_order_independent_and_sensitive():
    a = recipe_hash({"method": "rtn", "w_bits": 4, "nested": {"x": 1, "y": [1, 2]}})
    b = recipe_hash({"nested": {"y": [1, 2], "x": 1}, "w_bits": 4, "method": "rtn"})
    assert a == b and len(a) == 16
    assert recipe_hash({"method": "rtn", "w_bits": 3}) != recipe_hash({"method": "rtn", "w_bits": 4})


def _ev(k, n=10, paired=None, ee=0.01, ol=0.02):
    from daptq_ros.sim.metrics import wilson_interval

    out = {"successes": k, "episodes": n, "success_rate": k / n, "ci95": list(wilson_interval(k, n))}
    if paired is not None:
        out.update(paired=paired, ee_mean=ee, ee_final=2 * ee, open_loop=ol)
    out["per_task"] = {"door-open-v3": {"successes": k, "episodes": n}}
    return out


def _rows():
    p = {"both": 8, "only_reference": 1, "only_candidate": 0, "neither": 1}
    return [
        {
            "name": "fp",
            "method": "fp",
            "budget": "FP32",
            "avg_bits": 16.0,
            "size_ratio_fp16": 1.0,
            "drift_loss": 0.0,
            "status": "done",
            "eval": _ev(9),
        },
        {
            "name": "rtn@W4A8",
            "method": "rtn",
            "budget": "≤4.25 A8",
            "avg_bits": 4.06,
            "size_ratio_fp16": 0.27,
            "drift_loss": 0.02,
            "status": "done",
            "eval": _ev(8, paired=p, ee=0.02),
        },
        {
            "name": "daptq@m4.25",
            "method": "daptq",
            "budget": "≤4.25 A8",
            "avg_bits": 4.2,
            "size_ratio_fp16": 0.28,
            "drift_loss": 0.004,
            "status": "done",
            "eval": _ev(
                9, paired={"both": 9, "only_reference": 0, "only_candidate": 0, "neither": 1}, ee=0.008
            ),
        },
        {
            "name": "gptq@m4.25",
            "method": "gptq",
            "budget": "≤4.25 A8",
            "avg_bits": 4.06,
            "size_ratio_fp16": 0.27,
            "drift_loss": 0.01,
            "status": "done",
            "eval": _ev(9, paired={"both": 9, "only_reference": 0, "only_candidate": 0, "neither": 1}),
        },
        {
            "name": "daptq@m3.25",
            "method": "daptq",
            "budget": "≤3.25 A8",
            "avg_bits": 3.2,
            "size_ratio_fp16": 0.2,
            "drift_loss": 0.05,
            "status": "done",
            "eval": _ev(7, paired=p, ee=0.05),
        },
        {"name": "qvla@m2.5", "method": "qvla", "budget": "≤2.5 A8", "status": "failed: budget"},
    ]


def test_table_formatting():
    table = format_table(_rows())
    lines = table.splitlines()
    assert lines[0].startswith("| variant | budget | avg bits |") and len(lines) == 2 + 6
    assert all(line.count("|") == 12 for line in lines)
    fp_line, rtn_line = lines[2], lines[3]
    assert "90.0% (9/10)" in fp_line and "| 16.00 | 100.0% |" in fp_line
    assert "80.0% (8/10)" in rtn_line and "-10.0 pp" in rtn_line
    assert "8/1/0/1 (1)" in rtn_line  # McNemar p = 1.0 for one discordant pair
    assert "20.0 / 40.0" in rtn_line  # EE drift in mm
    assert "failed: budget" in lines[-1]
    tasks = format_task_table(_rows())
    assert tasks.splitlines()[0] == "| variant | door-open |" and "| fp | 9/10 |" in tasks


def test_targets_and_correlations():
    rows = _rows()
    checks = target_checks(rows, {"b425": "≤4.25 A8", "b325": "≤3.25 A8"})
    assert len(checks) == 4
    assert checks[0]["met"] is True and checks[0]["measured"] == "100.0% of FP"
    assert checks[1]["met"] is True  # 8 mm <= 0.5 * 20 mm
    assert checks[2]["met"] is False and checks[2]["measured"] == "77.8% of FP"
    assert checks[3]["met"] is True  # only m4.25 has both daptq and gptq rows
    corr = correlations(rows)
    assert corr["n"] == 4
    dup = [*rows, {**rows[1], "name": "rtn@m4.25"}]  # same run under another name counts once
    rows[1]["run"] = dup[-1]["run"] = "abc"
    assert correlations(dup)["n"] == 4
    # drift loss [0.02, 0.004, 0.01, 0.05] vs success [0.8, 0.9, 0.9, 0.7]
    assert corr["drift_loss_vs_success"] == pytest.approx(
        spearman([0.02, 0.004, 0.01, 0.05], [0.8, 0.9, 0.9, 0.7])
    )
    assert corr["drift_loss_vs_success"] < -0.9
    assert "not reported: 4 quantized variant(s)" in format_correlations(corr)  # too few to rank
    assert format_correlations({**corr, "n": 5}).startswith("Spearman ρ over 5 quantized variants")


def test_success_plot(tmp_path):
    from daptq_ros.quant.experiment_report import plot_success_vs_bits

    path = plot_success_vs_bits(_rows(), tmp_path / "p.png")
    assert path.is_file() and path.stat().st_size > 1000


# ------------------------------------------------------------------------- forward cache
@pytest.fixture(scope="module")
def tiny_vla(tmp_path_factory):
    from daptq_ros.model.adapter import ReferenceVLAAdapter
    from daptq_ros.model.data import calibration_batches
    from daptq_ros.model.io import load_checkpoint
    from daptq_ros.model.testing import write_synthetic_demos, write_tiny_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    ckpt = write_tiny_checkpoint(root / "ckpt")
    demos = write_synthetic_demos(root / "demos", episodes_per_task=2, length=12)
    loaded = load_checkpoint(ckpt)
    batches = calibration_batches(demos, loaded, n_frames=24, batch_size=8, seed=0)
    return loaded, ReferenceVLAAdapter(), batches, ckpt, demos


def test_forward_cache_matches_uncached(tiny_vla, monkeypatch):
    from daptq_ros.quant.calibration import HessianCollector, capture, run_batches
    from daptq_ros.quant.engine import get_module, set_module
    from daptq_ros.quant.fakequant import LayerSpec, make_quant_module, rtn_quantize

    loaded, adapter, batches, _, _ = tiny_vla
    model = copy.deepcopy(loaded.model)

    def both(fn):
        monkeypatch.setenv(forward_cache.ENV_SWITCH, "1")
        cached = fn()
        monkeypatch.setenv(forward_cache.ENV_SWITCH, "0")
        plain = fn()
        return cached, plain

    for _ in range(2):  # second round is served from the cache
        a, b = both(lambda: run_batches(model, adapter, batches))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    hits = forward_cache.stats(model)["hits"]
    assert hits > 0
    # replace a head layer by a fake-quant one: the head must be recomputed, the trunk reused
    name = "action_head.blocks.0.mlp.fc1"
    mod = get_module(model, name)
    spec = LayerSpec(w_bits=2, a_bits=16)
    set_module(model, name, make_quant_module(mod, spec, rtn_quantize(mod.weight.detach(), 2)))
    a, b = both(lambda: run_batches(model, adapter, batches))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # an in-place edit of a trunk LayerNorm invalidates everything after it
    with torch.no_grad():
        model.trunk.blocks[0].norm1.weight.mul_(1.5)
    a, b = both(lambda: run_batches(model, adapter, batches))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # .data swap of a root parameter (not inside any called module)
    model.readout.data = model.readout.data + 0.1
    a, b = both(lambda: run_batches(model, adapter, batches))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    # Hessians through capture (cut modules skipped, early stop) are the same
    def hessians():
        h = HessianCollector()
        capture(model, adapter, batches, ["trunk.blocks.0.mlp.fc2", "action_head.blocks.0.attn.q_proj"], h)
        return [h.hessian(n) for n in sorted(h.sums)]

    a, b = both(hessians)
    assert all(torch.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------------------- end to end
def _write_configs(tmp_path, ckpt, demos, variants):
    recipe = yaml.safe_load(open("config/quantize.yaml"))
    recipe.update(calib_frames=16, min_calib_frames=8, sweep_frames=8)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True))
    exp = {
        "version": 1,
        "checkpoint": str(ckpt),
        "demos": str(demos),
        "recipe": str(tmp_path / "recipe.yaml"),
        "out": str(tmp_path / "exp"),
        "budgets": {"W4A8": {"label": "W4A8", "w_bits": 4}, "m3.25": {"label": "≤3.25 A8", "budget": 3.25}},
        "target_budgets": {"b425": "W4A8", "b325": "≤3.25 A8"},
        "eval": {"tasks": ["reach-v3"], "episodes": 1, "max_steps": 6, "workers": 1, "image_size": 32},
        "variants": variants,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp, allow_unicode=True))
    return path


def test_resolve_recipe_budget_semantics(tiny_vla):
    from daptq_ros.quant.experiment import BudgetSpec, VariantSpec, resolve_recipe, uniform_avg_bits

    loaded, adapter, _, _, _ = tiny_vla
    base = yaml.safe_load(open("config/quantize.yaml"))
    b325 = BudgetSpec(label="m", w_bits=3, budget=3.25)
    r = resolve_recipe(base, b325, VariantSpec(method="rtn", budget="m"), loaded.model, adapter)
    assert r.budget is None and r.w_bits in (2, 3) and r.method_options == {"rtn": {}}
    assert uniform_avg_bits(loaded.model, adapter, r, r.w_bits) <= 3.25
    w4 = BudgetSpec(label="W4A8", w_bits=4)
    d = resolve_recipe(base, w4, VariantSpec(method="daptq", budget="W4A8"), loaded.model, adapter)
    assert d.budget == pytest.approx(uniform_avg_bits(loaded.model, adapter, d, 4), abs=1e-6)
    p = resolve_recipe(base, w4, VariantSpec(method="daptq_paper", budget="W4A8"), loaded.model, adapter)
    assert p.budget is None and p.method_options["daptq_paper"]["low_bits"] == 4
    o = resolve_recipe(
        base,
        w4,
        VariantSpec(method="daptq", budget="W4A8", recipe={"method_options": {"daptq": {"csrc": False}}}),
        loaded.model,
        adapter,
    )
    assert o.method_options["daptq"]["csrc"] is False and o.method_options["daptq"]["csrc_rank"] == 4


def test_experiment_end_to_end_and_resume(tmp_path, tiny_vla):
    from daptq_ros.cli import main

    _, _, _, ckpt, demos = tiny_vla
    cfg = _write_configs(
        tmp_path,
        ckpt,
        demos,
        [
            {"method": "fp"},
            {"method": "rtn", "budget": "W4A8"},
            {"method": "daptq", "budget": "m3.25"},
            {"method": "rtn", "budget": "m3.25"},
        ],
    )
    out = tmp_path / "exp"
    assert main(["experiment", "--config", str(cfg), "--json", str(tmp_path / "r.json")]) == 0
    res = json.loads((tmp_path / "r.json").read_text())
    rows = {r["name"]: r for r in res["rows"]}
    assert set(rows) == {"fp", "rtn@W4A8", "daptq@m3.25", "rtn@m3.25"}
    for r in rows.values():
        assert r["status"] == "done", r
        assert r["eval"]["episodes"] == 1
    assert rows["daptq@m3.25"]["avg_bits"] <= 3.25
    assert rows["rtn@W4A8"]["eval"]["paired"]["both"] + rows["rtn@W4A8"]["eval"]["paired"]["neither"] >= 0
    assert res["reference_consistent"] is True
    table = (out / "table.md").read_text()
    assert "| fp |" in table and "Spearman" in table and (out / "success_vs_bits.png").is_file()
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert len(runs) == 3  # three distinct recipes
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")}
    # resume: nothing is recomputed
    assert main(["experiment", "--config", str(cfg), "--only", "rtn@W4A8"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*.json")} == stamps
    again = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in again["rows"]] == ["done"] * 4  # cached rows are still shown
    assert again["rows"][1]["eval"] == rows["rtn@W4A8"]["eval"]


def test_experiment_config_errors(tmp_path, tiny_vla):
    from daptq_ros.cli import main

    _, _, _, ckpt, demos = tiny_vla
    cfg = _write_configs(tmp_path, ckpt, demos, [{"method": "rtn", "budget": "nope"}])
    assert main(["experiment", "--config", str(cfg)]) == 2
    assert main(["experiment", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_quantvla_on_flow_head_with_prefix_kv(tiny_vla):
    """The flow head's attention computes prefix keys once, then one q/k call per flow step."""
    from daptq_ros.quant import load_recipe, quantize_policy
    from daptq_ros.quant.methods.quantvla import pair_keys

    q = [torch.zeros(2, 3, 4)] * 2
    k = [torch.ones(2, 5, 4), torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)]
    assert [t.shape[1] for t in pair_keys(q, k)] == [8, 8]
    with pytest.raises(ValueError):
        pair_keys(q * 2, k)
    loaded, adapter, batches, _, _ = tiny_vla
    model = copy.deepcopy(loaded.model)
    recipe = load_recipe(
        {"method": "quantvla", "w_bits": 4, "calib_frames": 24, "min_calib_frames": 8, "sweep_frames": 8}
    )
    result = quantize_policy(model, adapter, batches, recipe)
    assert result.extras["atm_alpha"] and all(len(a) == 2 for a in result.extras["atm_alpha"].values())


def test_smoothquant_skips_layernorm_with_a_hidden_consumer(tiny_vla):
    """The trunk's last block reads a slice of norm1's output for its queries: smoothing norm1 into
    k/v only would change the float model, so that fold is undone."""
    from daptq_ros.quant import load_recipe, quantize_policy

    loaded, adapter, batches, _, _ = tiny_vla
    model = copy.deepcopy(loaded.model)
    with torch.no_grad():  # sharpen the (random, near-uniform) attention so queries matter
        for name in ("q_proj", "k_proj"):
            getattr(model.trunk.blocks[0].attn, name).weight.mul_(40.0)
    base = {"w_bits": 8, "a_bits": 16, "calib_frames": 24, "min_calib_frames": 8}
    smooth = quantize_policy(
        copy.deepcopy(model), adapter, batches, load_recipe({**base, "method": "smoothquant"})
    )
    assert smooth.extras["not_foldable"] == ["trunk.blocks.0.norm1"]
    assert "trunk.blocks.0.norm2" in smooth.extras["smoothed"]
    rtn = quantize_policy(copy.deepcopy(model), adapter, batches, load_recipe({**base, "method": "rtn"}))
    assert smooth.drift_loss < 10 * rtn.drift_loss + 1e-9
