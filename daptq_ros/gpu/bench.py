"""GPU speed benchmark: bf16 vs quantized matmuls at batch 1, against the bandwidth floor.

Run on the GPU machine (one command, ≤ 6 minutes on an H100, prints a markdown summary last)::

    PYTHONPATH=. python3 -m daptq_ros.gpu.bench --json $OUT/gpu_bench.json

What it does, in one process:

1. Machine info and the two ceilings (device-to-device copy / streaming-read bandwidth, bf16
   GEMM rate) — :func:`daptq_ros.gpu.timing.measure_ceilings`.
2. For each model — ``trunk-302m`` (VLA-sized, random weights), ``policy-trunk`` (the reference
   policy's trunk shapes), ``policy-e2e`` (the full reference VLA forward, when
   ``daptq_ros.model`` imports), and ``trunk-1007m`` while time allows — and each variant of
   :data:`daptq_ros.gpu.linear.VARIANTS` and token count M ∈ {1, 16, 64, 128}:
   a correctness check on fresh random inputs against the variant's own float32 reference
   (a variant outside the error band is marked invalid and not counted as a win), then
   CUDA-graph latency (median of ≥ 200 replays, rotating 4 input sets) of the full forward and
   of the model's Linears alone.
3. Ratios bf16 / variant, variant / bandwidth floor (weight bytes / measured bandwidth), the
   target check (≥ 1.6× over bf16, ≤ 2× the floor, on the VLA-sized trunk), a JSON file with
   everything (and the tuner's choices), and a speed-up-vs-size plot beside it.

``--smoke`` runs the same code on tiny shapes without a GPU (``TRITON_INTERPRET=1``; host timers,
no graphs): a test of the orchestration, not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from daptq_ros.gpu import kernels, report, timing
from daptq_ros.gpu.fused import FusedTrunk, FusionUnsupportedError
from daptq_ros.gpu.linear import (
    TRITON_VARIANTS,
    VARIANTS,
    QuantLinear,
    W4A16F16x2Linear,
    W4A16Linear,
    W8A8Linear,
    W8A16Linear,
    linear_modules,
    quantize_model,
    reference_model,
    weight_nbytes,
)
from daptq_ros.gpu.packing import relative_error
from daptq_ros.gpu.trunk import (
    TrunkConfig,
    build_trunk,
    policy_trunk_config,
    vla_trunk_config,
    wide_trunk_config,
)

log = logging.getLogger("daptq_ros.gpu.bench")

DEFAULT_MS = (1, 16, 64, 128)
# Linears whose forward launches our Triton kernels through Python (autotuner cache, split-K
# workspaces): kept out of Dynamo under --compile.
TRITON_LINEARS = (W4A16Linear, W4A16F16x2Linear, W8A16Linear, W8A8Linear)
_N_ROTATE = 4


@dataclass
class Settings:
    """Benchmark knobs (from the command line)."""

    device: torch.device
    ms: tuple[int, ...] = DEFAULT_MS
    variants: tuple[str, ...] = VARIANTS
    replays: int = 200
    warmup: int = 20
    rotate: int = _N_ROTATE
    budget_s: float = 330.0
    tune_budget_s: float = 150.0
    include_1b: bool = True
    models: tuple[str, ...] | None = None  # None = every model in the default order
    smoke: bool = False
    quick: bool = False
    compile: bool = False  # torch.compile (Inductor) the timed forward of trunks: fuses the non-matmul ops
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


@dataclass
class ModelSpec:
    """One model to benchmark: how to build it and its inputs."""

    name: str
    kind: str  # "trunk" or "policy_e2e"
    build: Callable[[], nn.Module]
    make_input: Callable[[int, int], Any]  # (M, seed) -> forward input (bf16)
    to_ref: Callable[[Any], Any]  # bf16 input -> float32 input for the reference
    ms: tuple[int, ...]
    params: int
    linear_params: int
    config: dict[str, Any]
    min_left_s: float = 0.0  # skip the model when less time than this is left
    prepare: Callable[[nn.Module], nn.Module] | None = None  # applied to every built / quantized model
    # what the correctness check compares: (model, input) -> tensors (the worst relative error counts)
    check_parts: Callable[[nn.Module, Any], list[torch.Tensor]] = lambda model, inp: [_call(model, inp)]


def _trunk_spec(cfg: TrunkConfig, settings: Settings, min_left_s: float = 0.0) -> ModelSpec:
    dev = settings.device

    def make_input(m: int, seed: int) -> torch.Tensor:
        gen = torch.Generator(device=dev).manual_seed(seed)
        return torch.randn(1, m, cfg.d_model, device=dev, generator=gen).to(torch.bfloat16)

    return ModelSpec(cfg.name, "trunk", lambda: build_trunk(cfg, dev), make_input, lambda x: x.float(),
                     settings.ms, cfg.param_count(), cfg.linear_param_count(), cfg.to_dict(), min_left_s)


def _policy_e2e_spec(settings: Settings) -> ModelSpec | None:
    """The full reference VLA (random weights, bf16), or None when ``daptq_ros.model`` is unavailable."""
    try:
        from daptq_ros.model.config import VLAConfig
        from daptq_ros.model.vla import ReferenceVLA
    except Exception as exc:
        log.warning("policy-e2e skipped: daptq_ros.model not importable (%s)", exc)
        return None
    tiny = {"d_model": 64, "heads": 2, "trunk_layers": 1, "head_layers": 1, "head_dim": 64, "image_size": 32,
            "flow_steps": 2}
    vc = VLAConfig(**tiny) if settings.smoke else VLAConfig()
    dev = settings.device

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = ReferenceVLA(vc)
        with torch.no_grad():  # random weights everywhere (the zero-initialized adaLN layers too);
            for mod in model.modules():  # biases stay 0 so the output depends on every weight
                if isinstance(mod, nn.Linear):
                    mod.weight.normal_(0.0, 0.02)
        return model.to(dev, torch.bfloat16).eval()

    probe = ReferenceVLA(vc)
    params = sum(p.numel() for p in probe.parameters())
    lin_params = sum(m.weight.numel() for m in probe.modules() if isinstance(m, nn.Linear))

    def make_input(_m: int, seed: int) -> dict[str, torch.Tensor]:
        inputs = probe.example_inputs(1, seed)
        return {k: v.to(dev, torch.bfloat16) for k, v in inputs.items()}

    n_tokens = vc.vision_tokens + vc.max_lang_tokens + 1 + vc.readout_tokens
    cfg = {"VLAConfig": {k: getattr(vc, k) for k in ("d_model", "heads", "trunk_layers", "head_layers",
                                                     "head_dim", "chunk_size", "flow_steps", "head")},
           "params": params, "linear_params": lin_params, "trunk_tokens": n_tokens}
    return ModelSpec("policy-e2e", "policy_e2e", build, make_input,
                     lambda inp: {k: v.float() for k, v in inp.items()}, (n_tokens,), params, lin_params, cfg,
                     prepare=_cast_linear_inputs, check_parts=_policy_parts)


def _policy_parts(model: nn.Module, inp: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The head conditioning z and the integrated flow (actions − noise), checked separately.

    With random weights the actions are mostly the input noise, and the DiT head's adaLN gates
    are small, so the actions alone would hide errors of the quantized trunk; z exposes them.
    """
    z = model.encode_condition(inp["image"], inp["lang_tokens"], inp["lang_mask"], inp["proprio"])
    return [z, _call(model, inp).float() - inp["noise"].float()]


def _cast_linear_inputs(model: nn.Module) -> nn.Module:
    """Cast each Linear's input to its compute dtype (pre-hooks, no-op when it already matches).

    The reference VLA computes its flow-time embedding in float32 (``timestep_embedding``) and
    feeds it to ``time_fc1``; in a bf16 model that Linear would reject the float32 input.
    """

    def hook(mod: nn.Module, args: tuple) -> tuple | None:
        dtype = mod.weight.dtype if isinstance(mod, nn.Linear) else torch.bfloat16
        x = args[0]
        return (x.to(dtype), *args[1:]) if x.is_floating_point() and x.dtype != dtype else None

    for mod in model.modules():
        if isinstance(mod, (nn.Linear, QuantLinear)) and not getattr(mod, "_daptq_cast_hook", False):
            mod.register_forward_pre_hook(hook)
            mod._daptq_cast_hook = True
    return model


def model_specs(settings: Settings) -> list[ModelSpec]:
    """The models in run order (most important first; the 1B trunk last and only if time allows)."""
    if settings.smoke:
        tiny = TrunkConfig(name="smoke-trunk", d_model=64, n_layers=2, n_heads=2, ffn=256)
        pol = TrunkConfig(name="smoke-policy-trunk", d_model=64, n_layers=1, n_heads=2, ffn=256,
                          fused_qkv=False, bias=True)
        specs = [_trunk_spec(tiny, settings), _trunk_spec(pol, settings)]
    else:
        specs = [_trunk_spec(vla_trunk_config(6), settings), _trunk_spec(policy_trunk_config(), settings)]
    wanted = settings.models
    if wanted is None or "policy-e2e" in wanted:
        e2e = _policy_e2e_spec(settings)
        if e2e is not None:
            specs.append(e2e)
    if not settings.smoke:
        specs.append(_trunk_spec(wide_trunk_config(2), settings, min_left_s=60.0))
    if settings.include_1b and not settings.smoke:
        specs.append(_trunk_spec(vla_trunk_config(20), settings, min_left_s=120.0))
    if wanted is not None:
        unknown = set(wanted) - {s.name for s in specs} - {"policy-e2e"}
        if unknown:
            raise SystemExit(f"unknown --models {sorted(unknown)}; known: {[s.name for s in specs]}")
        specs = [s for s in specs if s.name in wanted]
    return specs


def _call(model: nn.Module, inp: Any) -> torch.Tensor:
    return model(**inp) if isinstance(inp, dict) else model(inp)


def _linear_chain(model: nn.Module, m: int, dev: torch.device,
                  seed: int) -> tuple[Callable[[Any], Any], list]:
    """Step that runs every Linear of ``model`` once on (M, K) inputs; one input set per rotation."""
    lins = linear_modules(model)
    ks = sorted({lin.in_features for lin in lins})
    gen = torch.Generator(device=dev).manual_seed(seed)
    sets = [{k: torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16) for k in ks}
            for _ in range(_N_ROTATE)]

    def step(xs: dict[int, torch.Tensor]) -> None:
        for lin in lins:
            lin(xs[lin.in_features])

    return step, sets


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except Exception as exc:  # a broken CUDA context must not hide the results gathered so far
            log.error("emptying the CUDA cache failed: %s", exc)


@torch.no_grad()
def run_model(spec: ModelSpec, settings: Settings, bw_gbs: float, tflops: float) -> list[dict[str, Any]]:
    """Benchmark every variant × M of one model; returns result rows (errors recorded, never raised)."""
    dev = settings.device
    rows: list[dict[str, Any]] = []
    log.info("== %s (%.1fM params, %.0f s left)", spec.name, spec.params / 1e6, settings.left())
    prep = spec.prepare or (lambda mdl: mdl)
    base = prep(spec.build())
    ref_orig = reference_model(base)
    bf16_timed = base  # what the bf16 rows timed (its compiled form under --compile), timed again last
    bf16_err: dict[int, float] = {}
    for variant in settings.variants:
        common = {"model": spec.name, "params": spec.params, "variant": variant}
        if settings.left() < 15:
            rows += [{**common, "M": m, "status": "skipped", "error": "time budget"} for m in spec.ms]
            continue
        unavailable = _unavailable_reason(variant, dev)
        if unavailable:
            rows += [{**common, "M": m, "status": "unavailable", "error": unavailable} for m in spec.ms]
            continue
        try:
            model, qrep = quantize_model(base, variant)
            model = prep(model)
            ref = reference_model(model) if variant != "bf16" else ref_orig
        except FusionUnsupportedError as exc:
            rows += [{**common, "M": m, "status": "unavailable", "error": str(exc)} for m in spec.ms]
            continue
        except Exception as exc:
            log.exception("%s/%s: build failed", spec.name, variant)
            rows += [{**common, "M": m, "status": "error", "error": f"build: {type(exc).__name__}: {exc}"}
                     for m in spec.ms]
            continue
        wbytes = weight_nbytes(model)
        timed = _compiled(model) if settings.compile and spec.kind == "trunk" else model
        if variant == "bf16":
            bf16_timed = timed
        for m in spec.ms:
            if isinstance(model, FusedTrunk) and m != 1:
                rows.append({**common, "M": m, "status": "unavailable",
                             "error": "the fused trunk kernel runs one token (M = 1) only"})
                continue
            row = {**common, "M": m, "weight_bytes": wbytes, "quant": qrep.to_dict(),
                   **({"fused_config": vars(model.config), "fused_tuning": model.tuning}
                      if isinstance(model, FusedTrunk) else {}),
                   "compiled": timed is not model,
                   "floor_ms": report.bandwidth_floor_ms(wbytes, bw_gbs),
                   "compute_floor_ms": report.compute_floor_ms(m, spec.linear_params, tflops)}
            try:
                _check(row, timed, ref, ref_orig, spec, m, bf16_err)
                _time(row, timed, model, spec, m, settings)
                row["status"] = "ok" if row["valid"] else "invalid"
            except Exception as exc:
                log.exception("%s/%s/M=%d failed", spec.name, variant, m)
                row.update(status="error", error=f"{type(exc).__name__}: {str(exc)[:500]}")
            rows.append(row)
            log.info("%s %s M=%s: %s trunk %s ms, linears %s ms, err %s", spec.name, variant, m,
                     row.get("status"), _f(row.get("trunk_ms")), _f(row.get("linears_ms")),
                     _f(row.get("rel_err_kernel"), ".1e"))
        del model, ref, timed
        _free(dev)
    _repeat_bf16(rows, bf16_timed, spec, settings)
    del base, ref_orig, bf16_timed
    _free(dev)
    return rows


def _repeat_bf16(rows: list[dict[str, Any]], base: nn.Module, spec: ModelSpec, settings: Settings) -> None:
    """Time the bf16 model again after all variants: the spread between the two runs is the noise
    level a speed-up must exceed (``trunk_ms_repeat`` in the bf16 rows)."""
    for row in rows:
        if row["variant"] != "bf16" or row.get("status") != "ok" or settings.left() < 10:
            continue
        try:
            inputs = [spec.make_input(row["M"], 300 + i) for i in range(settings.rotate)]
            t = timing.time_graphs(lambda inp: _call(base, inp), inputs, settings.device, settings.replays,
                                   settings.warmup)
            row["trunk_ms_repeat"] = t["median_ms"]
        except Exception as exc:  # informational only
            log.warning("bf16 repeat of %s M=%s failed: %s", spec.name, row["M"], exc)


def _f(v: float | None, spec: str = ".4f") -> str:
    return "–" if v is None else format(v, spec)


def _unavailable_reason(variant: str, dev: torch.device) -> str | None:
    if variant in TRITON_VARIANTS and not kernels.triton_available():
        return "triton not importable / no CUDA device"
    if variant.startswith("torch_int4") and dev.type != "cuda":
        return "torch._weight_int4pack_mm (tinygemm) is CUDA only"
    return None


def _check(row: dict[str, Any], model: nn.Module, ref: nn.Module, ref_orig: nn.Module, spec: ModelSpec,
           m: int, bf16_err: dict[int, float]) -> None:
    """Correctness on a fresh random input: vs the variant's own float32 reference (kernel error)
    and vs the original float32 model (quantization error)."""
    seed = 10_000 + 7 * m + len(bf16_err)
    inp = spec.make_input(m, seed)
    ref_inp = spec.to_ref(inp)
    out = spec.check_parts(model, inp)
    err = max(relative_error(o, r) for o, r in zip(out, spec.check_parts(ref, ref_inp), strict=True))
    row["rel_err_kernel"] = err
    row["rel_err_quant"] = max(relative_error(o, r)
                               for o, r in zip(out, spec.check_parts(ref_orig, ref_inp), strict=True))
    if row["variant"] == "bf16":
        bf16_err[m] = err
    band = report.error_band(bf16_err.get(m))
    row["err_band"] = band
    row["valid"] = bool(err <= band)  # _time() then marks an invalid row's status "invalid"
    if not row["valid"]:
        log.warning("%s %s M=%d: rel err %.3e outside band %.1e -> invalid", row["model"], row["variant"], m,
                    err, band)


def _compiled(model: nn.Module) -> nn.Module:
    """``torch.compile`` (Inductor, static shapes) of the forward: LayerNorm / residual / GELU are
    fused into fewer kernels; matmuls stay the variant's own (cuBLAS, tinygemm, or our Triton
    kernels, which Dynamo either traces as user kernels or leaves behind a graph break). Compilation
    happens in the warm-up, before the CUDA graph is captured.

    The Triton-launching Linears get ``torch.compiler.disable``-d forwards here, not at class
    definition: running a kernel through a disabled frame breaks ``TRITON_INTERPRET`` runs of the
    CPU test-suite in the same process. A :class:`FusedTrunk` is one kernel already: returned as is."""
    if isinstance(model, FusedTrunk):
        return model
    for mod in model.modules():
        if isinstance(mod, TRITON_LINEARS):
            mod.forward = torch.compiler.disable(mod.forward)
    return torch.compile(model, dynamic=False)


def _time(row: dict[str, Any], timed: nn.Module, model: nn.Module, spec: ModelSpec, m: int,
          settings: Settings) -> None:
    """Latency of the full forward (``timed``: the model or its compiled form) and of the
    model's Linears alone (always eager modules, in one CUDA graph)."""
    dev = settings.device
    inputs = [spec.make_input(m, 100 + i) for i in range(settings.rotate)]
    t = timing.time_graphs(lambda inp: _call(timed, inp), inputs, dev, settings.replays, settings.warmup)
    row.update(trunk_ms=t["median_ms"], trunk_p10_ms=t["p10_ms"], trunk_p90_ms=t["p90_ms"],
               graphs=t["graphs"])
    if spec.kind == "trunk" and linear_modules(model):  # a fused trunk has no separate Linears
        step, sets = _linear_chain(model, m, dev, 200 + m)
        t = timing.time_graphs(step, sets[: settings.rotate], dev, settings.replays, settings.warmup)
        row.update(linears_ms=t["median_ms"], linears_p10_ms=t["p10_ms"], linears_p90_ms=t["p90_ms"])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m daptq_ros.gpu.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True,
                   help="where to write the results (plots go beside it)")
    p.add_argument("--quick", action="store_true", help="fewer tuning configs, M ∈ {1, 16}, no 1B trunk")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU with TRITON_INTERPRET=1 (a test)")
    p.add_argument("--ms", type=int, nargs="+", default=None, help=f"token counts (default {DEFAULT_MS})")
    p.add_argument("--variants", nargs="+", default=None, choices=VARIANTS, help="subset of variants")
    p.add_argument("--replays", type=int, default=200, help="timed graph replays per measurement")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="overall time budget in s (models / variants are skipped past it)")
    p.add_argument("--tune-budget-s", type=float, default=150.0, help="total autotuning time")
    p.add_argument("--no-1b", action="store_true", help="skip the ~1B-parameter trunk")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each trunk's forward (every variant, bf16 included) before timing")
    p.add_argument("--models", nargs="+", default=None,
                   help="subset of models by name (trunk-302m, policy-trunk, policy-e2e, trunk-315m-d4096, "
                        "trunk-1007m); default: all, in that order")
    return p.parse_args(argv)


def make_settings(args: argparse.Namespace) -> Settings:
    """Settings from parsed arguments (``--smoke`` and ``--quick`` shrink the run)."""
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA device: run on the GPU machine, or use --smoke for a CPU test run")
    ms = tuple(args.ms) if args.ms else ((1, 16) if args.quick or args.smoke else DEFAULT_MS)
    variants = tuple(args.variants) if args.variants else VARIANTS
    if "bf16" not in variants:
        variants = ("bf16", *variants)
    replays = min(args.replays, 5) if args.smoke else max(args.replays, 1)
    return Settings(device=device, ms=ms, variants=variants, replays=replays, warmup=1 if args.smoke else 20,
                    rotate=2 if args.smoke else _N_ROTATE, budget_s=args.budget_s,
                    tune_budget_s=0.0 if args.smoke else args.tune_budget_s,
                    include_1b=not (args.no_1b or args.quick or args.smoke),
                    models=tuple(args.models) if args.models else None, smoke=args.smoke,
                    quick=args.quick, compile=args.compile)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns 0 when it completed (whatever the targets), 1 on a fatal error."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    args = parse_args(argv)
    settings = make_settings(args)
    kernels.set_tuner(kernels.Autotuner(settings.tune_budget_s, quick=settings.quick or settings.smoke))
    torch.manual_seed(0)
    info = timing.machine_info(settings.device)
    log.info("machine: %s", info)
    ceilings = (timing.measure_ceilings(settings.device, copy_mib=64, gemm_n=256) if settings.smoke
                else timing.measure_ceilings(settings.device))
    rows: list[dict[str, Any]] = []
    models: list[dict[str, Any]] = []
    for spec in model_specs(settings):
        models.append({"name": spec.name, "kind": spec.kind, **spec.config})
        if settings.left() < max(30.0, spec.min_left_s):
            log.warning("skipping %s: %.0f s left of the %.0f s budget", spec.name, settings.left(),
                        settings.budget_s)
            rows += [{"model": spec.name, "params": spec.params, "variant": v, "M": m, "status": "skipped",
                      "error": "time budget"} for v in settings.variants for m in spec.ms]
            continue
        try:
            rows += run_model(spec, settings, ceilings["bw_gbs"], ceilings["gemm_tflops"])
        except Exception as exc:
            log.exception("model %s failed", spec.name)
            rows += [{"model": spec.name, "params": spec.params, "variant": v, "M": m, "status": "error",
                      "error": f"{type(exc).__name__}: {exc}"} for v in settings.variants for m in spec.ms]
            _free(settings.device)
        _write(args.json, info, ceilings, settings, models, rows, partial=True)  # survive a later crash
    summary = _write(args.json, info, ceilings, settings, models, rows, partial=False)
    _print_summary(info, ceilings, rows, summary, args.json, settings)
    return 0


def _spread(rows: list[dict[str, Any]]) -> str:
    diffs = [abs(r["trunk_ms_repeat"] - r["trunk_ms"]) / r["trunk_ms"] for r in rows
             if r.get("trunk_ms_repeat") is not None and r.get("trunk_ms")]
    return f"{100 * max(diffs):.1f}% over {len(diffs)} pairs" if diffs else "–"


def _write(path: Path, info: dict, ceilings: dict, settings: Settings, models: list, rows: list,
           partial: bool) -> list[dict[str, Any]]:
    report.add_ratios(rows)
    summary = report.target_summary(rows)
    tuner = kernels.get_tuner()
    doc = {
        "benchmark": "daptq_ros.gpu.bench", "partial": partial, "elapsed_s": round(settings.elapsed(), 1),
        "machine": info, "ceilings": ceilings,
        "settings": {"ms": settings.ms, "variants": settings.variants, "replays": settings.replays,
                     "warmup": settings.warmup, "rotate": settings.rotate, "budget_s": settings.budget_s,
                     "tune_budget_s": settings.tune_budget_s, "quick": settings.quick,
                     "smoke": settings.smoke, "compile": settings.compile},
        "targets": {"speedup": report.TARGET_SPEEDUP, "x_floor": report.TARGET_X_FLOOR, "summary": summary},
        "models": models, "rows": rows,
        "tuning": {"spent_s": round(tuner.spent_s, 1),
                   "records": [r.to_dict() for r in tuner.records.values()]},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str))
    return summary


def _print_summary(info: dict, ceilings: dict, rows: list, summary: list, path: Path,
                   settings: Settings) -> None:
    plots = []
    for m in sorted({r["M"] for r in rows if isinstance(r.get("M"), int)}):
        p = report.write_plot(rows, path.with_name(f"{path.stem}_speedup_M{m}.png"), m)
        if p:
            plots.append(str(p))
    machine = (f"{info.get('gpu') or 'CPU'} | driver/clocks {info.get('nvidia_smi', '–')} "
               f"| torch {info['torch']} | triton {info.get('triton')} | CUDA {info.get('cuda_runtime')}")
    measured = [r for r in rows if r.get("status") in ("ok", "invalid")]
    missing = sorted({f"{r['model']}/{r['variant']}: {r.get('status')} ({str(r.get('error'))[:80]})"
                      for r in rows if r.get("status") not in ("ok", "invalid")})
    # Full table first; the compact summary comes last (a caller may only see the output's tail).
    lines = [
        "", "## GPU benchmark, all rows (bf16 vs quantized matmuls at batch 1)", "",
        report.markdown_table(rows), "",
        "## GPU benchmark summary", "",
        f"Machine: {machine}",
        f"Ceilings: copy {ceilings['copy_gbs']:.0f} GB/s, read {ceilings['read_gbs']:.0f} GB/s "
        f"(floor uses {ceilings['bw_gbs']:.0f} GB/s), bf16 GEMM {ceilings['gemm_tflops']:.0f} TFLOP/s",
        f"Latency: median of {settings.replays} CUDA-graph replays rotating {settings.rotate} input sets; "
        "'trunk' = full forward, 'lin' = the model's Linears alone; floor = weight bytes / bandwidth; "
        "rel err vs the variant's own float32 reference.", "",
        report.markdown_table(measured, report.COMPACT_COLUMNS), "",
        "Not measured: " + ("; ".join(missing) if missing else "none"), "",
        f"### Targets (VLA-sized trunk, full forward): ≥{report.TARGET_SPEEDUP}× over bf16 and "
        f"≤{report.TARGET_X_FLOOR}× the bandwidth floor", "",
        report.targets_table(summary) if summary else "(no valid quantized VLA-sized result)", "",
        f"JSON: {path}" + (f" | plots: {', '.join(plots)}" if plots else ""),
        f"bf16 timed twice (start and end of each model): largest difference {_spread(rows)}",
        f"Elapsed: {settings.elapsed():.0f} s (tuning {kernels.get_tuner().spent_s:.0f} s)",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
