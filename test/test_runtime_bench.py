"""`daptq bench` on two toy artifacts (timings are reported, never asserted)."""

import json

import pytest
from test_export_fp32 import build_artifact
from test_export_qdq import rtn

from daptq_ros.cli import main
from daptq_ros.export.qdq import export_qdq
from daptq_ros.runtime.bench import benchmark


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model, fp = build_artifact(root / "fp32", seed=2)
    plan = [rtn("lang_proj", model.lang_proj.weight, 4, 32), rtn("fc1", model.fc1.weight, 4, 16)]
    export_qdq(fp, plan, root / "w4", flavour="cpu", method="rtn")
    return fp, root / "w4"


def test_benchmark_results(artifacts):
    results, machine = benchmark(list(artifacts), runs=12, warmup=2, threads=1, rounds=3, runtime_ops=True)
    assert [r.runs for r in results] == [12, 12]
    assert results[0].speedup_vs_first == 1.0 and results[0].size_ratio_vs_first == 1.0
    assert results[0].latency_ratio == 1.0  # paired per-round ratio against itself
    assert results[1].latency_ratio_p25 <= results[1].latency_ratio <= results[1].latency_ratio_p75
    assert results[1].size_ratio_vs_first < 1.0  # int4 weights are smaller
    # FP16 reference = the first (fp32) graph with float16 initializers: about half its size
    assert 1.8 < results[0].size_vs_fp16 < 2.0 and results[1].size_vs_fp16 < results[0].size_vs_fp16
    assert results[1].kernels == {"nbits": 2} and results[0].kernels == {}
    assert results[1].runtime_ops["MatMulNBits"] == 2 and "DequantizeLinear" not in results[1].runtime_ops
    assert results[1].method == "rtn" and results[1].flavour == "cpu"
    assert all(r.min_ms <= r.median_ms <= r.p99_ms for r in results)
    assert machine["cores"] >= 1 and machine["onnxruntime"] and machine["provider"] == "CPUExecutionProvider"


def test_u8s8_saturation_warning_only_for_8bit_weights_without_vnni(artifacts, tmp_path, caplog):
    import logging

    from test_export_fp32 import build_artifact

    from daptq_ros.export.cpu import CpuOptions
    from daptq_ros.runtime.manifest import read_manifest
    from daptq_ros.runtime.session import PolicySession, u8s8_saturation_layers

    model, fp = build_artifact(tmp_path / "fp32", seed=3)
    plan = [
        rtn("fc1", model.fc1.weight, 8, input_scale=0.05),
        rtn("fc2", model.fc2.weight, 4, input_scale=0.05),
    ]
    export_qdq(fp, plan, tmp_path / "s8", flavour="cpu", method="rtn")
    export_qdq(
        fp, plan, tmp_path / "u8", flavour="cpu", method="rtn", cpu_options=CpuOptions(u8_weights=True)
    )
    s8, u8 = read_manifest(tmp_path / "s8"), read_manifest(tmp_path / "u8")
    avx2 = {"avx2", "fma"}
    assert u8s8_saturation_layers(s8, avx2) == ["fc1"]  # 8-bit weights; 4-bit fc2 cannot overflow
    assert u8s8_saturation_layers(s8, avx2 | {"avx512_vnni"}) == []
    assert u8s8_saturation_layers(s8, {"asimd"}) == []  # Arm: int32 dot products
    assert u8s8_saturation_layers(u8, avx2) == []  # U8U8 kernels
    assert u8s8_saturation_layers(read_manifest(artifacts[1]), avx2) == []  # MatMulNBits only
    with caplog.at_level(logging.WARNING, logger="daptq_ros.runtime.session"):
        PolicySession(tmp_path / "s8", threads=1)
    warned = any("--cpu-u8-weights" in r.getMessage() for r in caplog.records)
    assert warned == bool(u8s8_saturation_layers(s8))  # only on a non-VNNI x86 machine


def test_bench_cli_json_and_errors(artifacts, tmp_path, capsys):
    out = tmp_path / "b.json"
    argv = [
        "bench",
        "--artifacts",
        *map(str, artifacts),
        "--runs",
        "4",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--rounds",
        "2",
        "--runtime-ops",
        "--json",
        str(out),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| fp32 | fp32 | fp32 |" in table and "| w4 | rtn | cpu |" in table
    assert "size / FP16" in table and "latency ratio" in table
    assert "- w4: kernels {'nbits': 2}; ORT runs {" in table and "'MatMulNBits': 2" in table
    data = json.loads(out.read_text())
    assert len(data["results"]) == 2 and len(data["results"][1]["latencies_ms"]) == 4
    assert main(["bench", "--artifacts", str(tmp_path / "missing")]) == 2
    assert main(["bench", "--artifacts", str(artifacts[0]), "--runs", "0"]) == 2
