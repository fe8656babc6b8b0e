#!/usr/bin/env bash
# Runs the test suite in .venv (created by `make test`). pytest exit code 5 ("no tests
# collected") is an error here: a suite that runs nothing must not look green.
set -uo pipefail
cd "$(dirname "$0")/.."
export MUJOCO_GL="${MUJOCO_GL:-egl}"
export ROS_AUTOMATIC_DISCOVERY_RANGE="${ROS_AUTOMATIC_DISCOVERY_RANGE:-LOCALHOST}"
.venv/bin/python -m pytest -ra "$@" test
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
