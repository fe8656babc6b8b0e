"""Device-only diagnostic: rewrite this checkout's Triton (register-ring) fused kernel so its cell
loop does no arithmetic.

    python3 scripts/gpu_fused_nodot.py     # edits daptq_ros/gpu/_triton_fused.py in place
    PYTHONPATH=. python3 -m daptq_ros.gpu.fused_bench --json nodot.json --trace-only --config tma=0

(``tma=0``: the default config runs the TMA kernel, ``_gluon_fused.py``, which this does not touch.)

The int4 dot of each cell becomes an xor of its weight and activation words (so every load stays
live and is still issued where it was), leaving the loads, atomics, prologues and barriers as
they are. The forward's output is then meaningless; its timeline says how fast the same kernel
would be if the dot cost nothing (docs/gpu_bench.md, seventh run). Run it on a throw-away copy
(the GPU machine's) and never commit the result: ``git checkout daptq_ros/gpu/_triton_fused.py``
undoes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

KERNEL = Path(__file__).resolve().parents[1] / "daptq_ros" / "gpu" / "_triton_fused.py"
DOT = "        part = _q4x32_dot(w, x, USE_ASM)\n"
NO_DOT = ("        xx = x[0] ^ x[1] ^ x[2] ^ x[3] ^ x[4] ^ x[5] ^ x[6] ^ x[7] ^ x[8] ^ x[9] ^ x[10] ^ x[11]"
          " ^ x[12] ^ x[13] ^ x[14] ^ x[15]\n"
          "        part = ((w[0] ^ w[1] ^ w[2] ^ w[3] ^ xx[:, None]) & 0x3FFFFF).to(tl.float32) * 1e-30\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", type=Path, default=KERNEL, help="the kernel source to patch")
    kernel = p.parse_args(argv).kernel
    text = kernel.read_text()
    if text.count(DOT) != 1:
        raise SystemExit(f"{kernel}: the quad dot line was not found once (already patched, or the kernel "
                         "changed)")
    kernel.write_text(text.replace(DOT, NO_DOT))
    print(f"patched {kernel}: the cell loop's dot is an xor now (diagnostic only)")


if __name__ == "__main__":
    main()
