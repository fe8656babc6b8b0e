#!/usr/bin/env bash
# Release-gate comparison on a bag recorded from the simulated robot (docs/drift_check.md):
#   1. export the FP32 reference artifact,
#   2. record a bag while the FP artifact drives the Meta-World sim through ROS 2
#      (policy_node + sim_bridge over DDS; `daptq record` beside them),
#   3. calibrate RTN and DA-PTQ at the same budget (<= 4.25 average bits, int8 activations: RTN's
#      largest uniform fit is W4) from a second bag (converted from scripted
#      demos, so calibration and test frames differ) and export both (cpu flavour),
#   4. drift-check each candidate against FP on the sim bag (exit code 0 pass / 1 fail), with the
#      default gate (config/drift.yaml) and the looser sim gate (config/drift_sim_gate.yaml).
# Usage: bash scripts/drift_gate_sim.sh [OUTDIR]   (about 10 min on the 2-core CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/drift_gate}
DAPTQ=${DAPTQ:-.venv/bin/daptq}
EPISODES=${EPISODES:-1}
MAX_STEPS=${MAX_STEPS:-120}
BUDGET=${BUDGET:-4.25}
CHECKPOINT=${CHECKPOINT:-daptq_ros/assets/reference_vla.safetensors}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export ROS_AUTOMATIC_DISCOVERY_RANGE=${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}
mkdir -p "$OUT"
run() { echo "+ $*" >&2; "$@"; }

[ -f "$OUT/fp/manifest.json" ] || run $DAPTQ export --checkpoint "$CHECKPOINT" --out "$OUT/fp" \
  > "$OUT/export_fp.log" 2>&1 || exit 2

if [ ! -d "$OUT/sim_bag" ]; then
  echo "+ $DAPTQ record --out $OUT/sim_bag ..." >&2
  # started directly (not through run()) so that $! is the recorder itself: SIGINT finalizes the bag
  $DAPTQ record --out "$OUT/sim_bag" --discovery-timeout 120 --duration 1500 \
    --json "$OUT/record.json" > "$OUT/record.log" 2>&1 &
  rec=$!
  run $DAPTQ launch policy --sim --artifact "$OUT/fp" --tasks all --episodes "$EPISODES" \
    --max-steps "$MAX_STEPS" --timeout 1400 --json "$OUT/launch.json" > "$OUT/launch.log" 2>&1
  kill -INT "$rec"; wait "$rec" || { echo "recorder failed: $OUT/record.log" >&2; exit 2; }
fi

if [ ! -d "$OUT/calib_bag" ]; then
  [ -d "$OUT/calib_demos" ] || run $DAPTQ sim demos --out "$OUT/calib_demos" --tasks all \
    --episodes-per-task 3 --seed 50000 --workers 2 --json "$OUT/calib_demos.json" > /dev/null || exit 2
  run $DAPTQ record --from-demos "$OUT/calib_demos" --out "$OUT/calib_bag" || exit 2
fi

for method in rtn daptq; do
  if [ ! -f "$OUT/$method/manifest.json" ]; then
    run $DAPTQ quantize --calib-bag "$OUT/calib_bag" --checkpoint "$CHECKPOINT" --method "$method" \
      --budget "$BUDGET" --out "$OUT/q_$method" --json "$OUT/q_$method.json" > "$OUT/q_$method.log" 2>&1 || exit 2
    run $DAPTQ export --quantized "$OUT/q_$method/quantized.safetensors" --flavour cpu \
      --out "$OUT/$method" > "$OUT/export_$method.log" 2>&1 || exit 2
  fi
done

status=0
for gate in drift drift_sim_gate; do   # the default gate, then the looser sim gate (see its header)
  for method in rtn daptq; do
    run $DAPTQ drift-check --bag "$OUT/sim_bag" --reference "$OUT/fp" --candidate "$OUT/$method" \
      --thresholds "config/$gate.yaml" --report "$OUT/report_${gate}_$method" --no-progress
    code=$?
    echo "drift-check $method, config/$gate.yaml: exit $code (report: $OUT/report_${gate}_$method/report.md)"
    [ "$code" -ge 2 ] && status=2
  done
done
exit $status
