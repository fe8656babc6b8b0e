#!/usr/bin/env bash
# Source this at the start of a command on the GPU machine (device tool): unpacks the carried GL
# loaders and Meta-World wheels (that machine has no package registry). See docs/reproduce.md.
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" MUJOCO_GL=egl PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
