"""Execution-provider selection and fallback, tested on provider lists (no GPU here)."""

import pytest

from daptq_ros.runtime.providers import CPU, CUDA, TENSORRT, ProviderOptions, select_providers

ALL = [TENSORRT, CUDA, CPU]


def test_full_gpu_build_orders_trt_cuda_cpu():
    providers, report = select_providers(available=["AzureExecutionProvider", CPU, CUDA, TENSORRT])
    assert [p[0] for p in providers] == ALL
    assert report.primary == TENSORRT and report.skipped == {}
    trt_opts = dict(providers)[TENSORRT]
    assert trt_opts["trt_engine_cache_enable"] == "True"
    assert trt_opts["trt_engine_cache_path"].endswith("trt_engines")
    assert "~" not in trt_opts["trt_engine_cache_path"]


def test_cpu_only_build_reports_why(caplog):
    caplog.set_level("INFO")
    providers, report = select_providers(available=[CPU])
    assert providers == [(CPU, {})]
    assert "not installed" in report.skipped[TENSORRT] and "not installed" in report.skipped[CUDA]
    assert "using CPUExecutionProvider" in caplog.text


def test_config_excludes_and_aliases():
    providers, report = select_providers(["cuda", "cpu"], available=ALL)
    assert [p[0] for p in providers] == [CUDA, CPU]
    assert report.skipped == {TENSORRT: "excluded by config"}
    with pytest.raises(ValueError, match="none of the allowed"):
        select_providers(["tensorrt"], available=[CPU])


def test_unknown_and_empty_names():
    with pytest.raises(ValueError, match="unknown execution provider 'OpenVINO'"):
        select_providers(["OpenVINO"], available=ALL)
    with pytest.raises(ValueError, match="empty"):
        select_providers([], available=ALL)


def test_trt_options():
    opts = ProviderOptions(
        trt_fp16=False, trt_int8=True, trt_max_workspace_size=1 << 20, trt_engine_cache_path="/tmp/eng"
    ).for_provider(TENSORRT)
    assert opts["trt_fp16_enable"] == "False" and opts["trt_int8_enable"] == "True"
    assert opts["trt_max_workspace_size"] == str(1 << 20) and opts["trt_engine_cache_path"] == "/tmp/eng"
    with pytest.raises(ValueError, match="device_id"):
        ProviderOptions(device_id=-1)


def test_default_uses_installed_onnxruntime():
    import onnxruntime as ort

    _providers, report = select_providers()
    assert report.primary in ort.get_available_providers()
