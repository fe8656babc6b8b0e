"""Torch fake-quant vs exported ONNX parity on real calibration frames.

``python -m daptq_ros.quant.parity --quantized Q.safetensors --artifact DIR --demos DEMOS``
loads the quantized checkpoint as the torch fake-quant model, runs the artifact's
``model.onnx`` with ONNX Runtime (CPU) on the same frames and noise, and prints the relative
error ``‖ort − torch‖ / ‖torch‖`` of the normalized action chunks, next to the quantization
error itself (``‖torch − FP‖ / ‖FP‖``) for scale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def parity(quantized: str | Path, artifact: str | Path, demos: str | Path, frames: int = 64) -> dict:
    """Relative errors (ORT vs torch fake-quant, torch fake-quant vs FP) on ``frames`` demo frames."""
    import torch

    from daptq_ros.model.data import calibration_batches
    from daptq_ros.model.io import LoadedPolicy, parse_checkpoint_meta
    from daptq_ros.quant.checkpoint import load_quantized, read_quant_meta
    from daptq_ros.runtime.session import PolicySession

    model, info = load_quantized(quantized)
    base = read_quant_meta(quantized)["base"]
    config, norm = parse_checkpoint_meta(base)
    fp_path = Path(info.meta.get("provenance", {}).get("checkpoint") or "")
    loaded = LoadedPolicy(model=model, config=config, norm=norm, meta=base, path=Path(quantized))
    batches = calibration_batches(demos, loaded, n_frames=frames, batch_size=16, seed=123)
    sess = PolicySession(artifact, providers=["CPUExecutionProvider"], threads=1)
    names = sess.input_names
    batch = next((s.shape[0] for s in sess.manifest.inputs if isinstance(s.shape[0], int)), None)
    fp_model = None
    if fp_path.is_file():
        from daptq_ros.model.io import load_checkpoint

        fp_model = load_checkpoint(fp_path).model
    tq, oq, fq = [], [], []
    with torch.no_grad():
        for b in batches:
            feeds = {k: b[k] for k in names}
            tq.append(model(**feeds).numpy())
            np_feeds = {k: v.numpy() for k, v in feeds.items()}
            n = len(np_feeds[names[0]])
            step = batch or n  # artifacts exported with a fixed batch of 1 run frame by frame
            outs = [
                sess.run({k: v[i : i + step] for k, v in np_feeds.items()})[sess.output_names[0]]
                for i in range(0, n, step)
            ]
            oq.append(np.concatenate(outs))
            if fp_model is not None:
                fq.append(fp_model(**feeds).numpy())
    t, o = np.concatenate(tq), np.concatenate(oq)
    out = {
        "frames": int(t.shape[0]),
        "ort_vs_torch_rel_err": rel_err(o, t),
        "ort_vs_torch_max_abs": float(np.abs(o - t).max()),
        "provider": sess.provider,
        "flavour": sess.manifest.flavour,
    }
    if fq:
        out["torch_quant_vs_fp_rel_err"] = rel_err(t, np.concatenate(fq))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantized", required=True)
    p.add_argument("--artifact", required=True, help="exported artifact directory (model.onnx)")
    p.add_argument("--demos", required=True)
    p.add_argument("--frames", type=int, default=64)
    args = p.parse_args(argv)
    print(json.dumps(parity(args.quantized, args.artifact, args.demos, args.frames), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
