"""Build the latency/size benchmark artifacts of ``docs/cpu_latency.md`` (no data or training needed).

The packaged trained reference VLA (``daptq_ros/assets/reference_vla.safetensors``; or, with
``--checkpoint random``, a default-config :class:`~daptq_ros.model.vla.ReferenceVLA` with seeded
random weights) is quantized by the real quantizer (:func:`daptq_ros.quant.api.quantize_policy`)
on seeded random contract-shaped calibration frames, saved as quantized checkpoints and exported
like ``daptq export`` does::

    python -m daptq_ros.export.bench_models --out /tmp/bench --trt --dq-baseline
    daptq bench --artifacts /tmp/bench/fp32 /tmp/bench/w8a8 /tmp/bench/w4a8 /tmp/bench/mixed \
        /tmp/bench/mixed_trt /tmp/bench/mixed_dq --threads 1 --runs 400 --rounds 40 --runtime-ops

Artifacts: ``fp32``; ``w8a8`` (RTN int8 weights + static int8 activations), ``w4a8`` (RTN int4
per-channel weights + int8 activations), ``mixed`` (the ``daptq`` method at the recipe budget,
default 4.25 bits: per-layer 2/3/4/8/16-bit weights, int8 activations), all in the ``cpu``
flavour; ``--trt`` also writes ``*_trt`` (TensorRT-rules QDQ) twins. Latency and size do not
depend on the weight or calibration values, so this measures the deployable graph honestly;
task accuracy does (quantize with real calibration data, ``daptq quantize --demos``, for that).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

NORM = {
    "proprio_mean": [0.0, 0.6, 0.2, 0.5],
    "proprio_std": [0.1, 0.1, 0.05, 0.3],
    "action_mean": [0.0, 0.0, 0.0, 0.0],
    "action_std": [1.0, 1.0, 1.0, 1.0],
}
INSTRUCTION = "reach the red target"
RECIPES: dict[str, dict[str, Any]] = {
    "w8a8": {"method": "rtn", "w_bits": 8, "a_bits": 8},
    "w4a8": {"method": "rtn", "w_bits": 4, "a_bits": 8},
    "mixed": {"method": "daptq", "a_bits": 8},
}


REPO_RECIPE = Path(__file__).resolve().parents[2] / "config" / "quantize.yaml"
ASSET_CHECKPOINT = Path(__file__).resolve().parents[1] / "assets" / "reference_vla.safetensors"


def bench_recipe(name: str, budget: float, calib_frames: int, seed: int) -> Any:
    """The repository recipe (config/quantize.yaml) with the benchmark's method/bits/budget.

    DA-PTQ's CSRC compensation is switched off here: on a fake-quant model
    ``ReferenceVLAAdapter.interface_layers`` finds no ``nn.Linear`` and raises (reported upstream);
    compensation folds into ``fc2``'s weights and changes neither the graph nor its size.
    """
    import yaml

    from daptq_ros.quant.recipe import load_recipe

    data = yaml.safe_load(REPO_RECIPE.read_text()) if REPO_RECIPE.is_file() else {}
    spec = dict(RECIPES[name])
    data.update(
        method=spec["method"],
        a_bits=spec["a_bits"],
        calib_frames=calib_frames,
        min_calib_frames=min(32, calib_frames),
        sweep_frames=min(16, calib_frames),
        seed=seed,
        budget=budget if spec["method"] == "daptq" else None,
    )
    if "w_bits" in spec:
        data["w_bits"] = spec["w_bits"]
    options = dict(data.get("method_options") or {})
    options[spec["method"]] = {
        **(options.get(spec["method"]) or {}),
        **({"csrc": False} if spec["method"] == "daptq" else {}),
    }
    data["method_options"] = {spec["method"]: options[spec["method"]]}
    return load_recipe(data)


def random_vla(seed: int = 0, config: Any = None) -> Any:
    """Seeded ReferenceVLA (default config) with a non-trivial action head."""
    import torch

    from daptq_ros.model.config import VLAConfig
    from daptq_ros.model.vla import ReferenceVLA

    torch.manual_seed(seed)
    model = ReferenceVLA(config or VLAConfig()).eval()
    with torch.no_grad():  # adaLN-zero init makes every DiT block the identity
        for p in model.action_head.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _random_table(model: Any, seed: int) -> Any:
    import numpy as np

    from daptq_ros.runtime.instructions import InstructionTable

    rng = np.random.default_rng(seed)
    mask = np.zeros(model.config.max_lang_tokens, np.float32)
    mask[:8] = 1.0
    tokens = rng.standard_normal((model.config.max_lang_tokens, model.config.lang_dim)).astype(np.float32)
    return InstructionTable({INSTRUCTION: (tokens * mask[:, None], mask)})


def calibration_batches(model: Any, frames: int = 32, batch: int = 8, seed: int = 1) -> list[dict[str, Any]]:
    """Contract-shaped random frames (images in [0, 1], 8 valid language tokens, fixed noise)."""
    return [model.example_inputs(batch, seed=seed + i) for i in range(-(-frames // batch))]


def build(
    out: Path,
    names: list[str],
    budget: float = 4.25,
    calib_frames: int = 32,
    trt: bool = False,
    seed: int = 0,
    reuse: bool = False,
    checkpoint: Path | None = None,
    dq_baseline: bool = False,
) -> dict[str, Path]:
    """Write the artifacts ``names`` (subset of fp32 + RECIPES) under ``out``; returns name -> dir.

    ``checkpoint``: FP checkpoint to quantize (its ``instructions.safetensors`` is shipped when it
    sits beside it); None = a seeded random-weight default-config ReferenceVLA. ``dq_baseline``
    also writes ``*_dq``: the former CPU flavour (weight-only blocked/per-channel
    ``DequantizeLinear`` before float MatMul/Gemm/Conv, activations float) for comparison.
    """

    from daptq_ros.export.cpu import CpuOptions
    from daptq_ros.export.onnx_export import export_policy
    from daptq_ros.export.qdq import export_qdq
    from daptq_ros.export.quantized import read_quantized
    from daptq_ros.model.adapter import ReferenceVLAAdapter
    from daptq_ros.model.io import NormStats, read_metadata, save_checkpoint
    from daptq_ros.quant.api import quantize_policy
    from daptq_ros.quant.checkpoint import save_quantized
    from daptq_ros.runtime.instructions import InstructionTable

    out.mkdir(parents=True, exist_ok=True)
    if checkpoint is not None:
        from daptq_ros.model.io import load_checkpoint

        loaded = load_checkpoint(checkpoint)

        def fresh() -> Any:
            return load_checkpoint(checkpoint).model.eval()

        model, norm, fp_ckpt = loaded.model.eval(), loaded.norm.to_dict(), Path(checkpoint)
        beside = fp_ckpt.parent / "instructions.safetensors"
        if beside.is_file():
            table = InstructionTable.load(beside)
        else:
            table = _random_table(model, seed)
    else:

        def fresh() -> Any:
            return random_vla(seed)

        model, norm = random_vla(seed), NORM
        fp_ckpt = save_checkpoint(
            out / "checkpoints" / "fp32.safetensors",
            model,
            NormStats.from_dict(NORM),
            {"instructions": [INSTRUCTION]},
        )
        table = _random_table(model, seed)
    base = read_metadata(fp_ckpt)["daptq.checkpoint"]
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="daptq_bench_fp_") as tmp:
        fp_dir = out / "fp32" if "fp32" in names else Path(tmp) / "fp32"
        export_policy(
            model,
            model.example_inputs(1),
            fp_dir,
            norm=norm,
            instructions_cache=table,
            config_meta={
                "checkpoint": str(fp_ckpt),
                "model": base.get("config", {}),
                "bench_models": {"seed": seed},
            },
        )
        if "fp32" in names:
            written["fp32"] = fp_dir
        for name in [n for n in names if n in RECIPES]:
            q_path = out / "checkpoints" / f"{name}.safetensors"
            if not (reuse and q_path.is_file()):
                recipe = bench_recipe(name, budget, calib_frames, seed)
                qmodel = fresh()
                result = quantize_policy(
                    qmodel, ReferenceVLAAdapter(), calibration_batches(qmodel, calib_frames), recipe
                )
                save_quantized(
                    q_path, qmodel, result, base, {"command": "python -m daptq_ros.export.bench_models"}
                )
                logger.info("%s: %s, %.3f avg bits", name, recipe.method, result.avg_bits)
            ckpt = read_quantized(q_path)
            flavours = ["cpu", "trt"] if trt else ["cpu"]
            if dq_baseline:
                flavours.append("dq")
            for flavour in flavours:
                dest = out / (name if flavour == "cpu" else f"{name}_{flavour}")
                plan = ckpt.plan
                if flavour == "dq":  # the former CPU flavour: weight-only DequantizeLinear, float ops
                    plan = [dataclasses.replace(lq, input_scale=None) for lq in ckpt.plan]
                export_qdq(
                    fp_dir,
                    plan,
                    dest,
                    flavour="trt" if flavour == "dq" else flavour,
                    method=ckpt.method if flavour != "dq" else f"{ckpt.method}-weight-only-dq",
                    budget=ckpt.budget,
                    avg_bits=ckpt.avg_bits,
                    extra_config={"recipe": ckpt.meta.get("recipe", {})},
                    cpu_options=CpuOptions() if flavour == "cpu" else None,
                )
                written[dest.name] = dest
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--only", nargs="+", default=["fp32", *RECIPES], choices=["fp32", *RECIPES])
    parser.add_argument("--budget", type=float, default=4.25, help="daptq (mixed) average-bit budget")
    parser.add_argument("--calib-frames", type=int, default=32)
    parser.add_argument("--trt", action="store_true", help="also write TensorRT-flavour twins (*_trt)")
    parser.add_argument(
        "--dq-baseline",
        action="store_true",
        help="also write *_dq: the former CPU flavour (weight-only DequantizeLinear + float ops)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--checkpoint",
        default=str(ASSET_CHECKPOINT),
        help="FP checkpoint to quantize (default: the packaged trained reference VLA); 'random' = a "
        "seeded random-weight default-config ReferenceVLA",
    )
    parser.add_argument(
        "--reuse-checkpoints", action="store_true", help="re-export existing OUT/checkpoints/*.safetensors"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(1)
    checkpoint = None if args.checkpoint == "random" else Path(args.checkpoint)
    if checkpoint is not None and not checkpoint.is_file():
        parser.error(f"--checkpoint {checkpoint}: not found (use 'random' for random weights)")
    written = build(
        args.out,
        args.only,
        args.budget,
        args.calib_frames,
        args.trt,
        args.seed,
        reuse=args.reuse_checkpoints,
        checkpoint=checkpoint,
        dq_baseline=args.dq_baseline,
    )
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
