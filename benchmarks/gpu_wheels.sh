#!/usr/bin/env bash
# Prepare, on this (CPU) machine, the wheels that benchmarks/gpu_suite.sh installs on the GPU machine, whose image
# has torch, triton, transformers and peft but no diffusers, deepspeed or bitsandbytes. They go to .whl/ (ignored by
# git; the device tool carries it): diffusers as PyPI's wheel, deepspeed as a wheel built here (PyPI has only its
# source), plus deepspeed's small pure-Python needs. bitsandbytes' wheel does not fit the 64 MiB carry with the
# rest, so the 8-bit rows of the GPU suite are skipped there and stay CPU figures (labelled so).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/pip}"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux2014_x86_64)
"$PIP" download -q --no-deps "${plat[@]}" -d .whl "diffusers==0.42.1" hjson py-cpuinfo msgpack \
  "pydantic==2.14.4" "pydantic-core==2.50.5" annotated-types typing-inspection  # deepspeed's config (and accelerate imports deepspeed when it is there)
"$PIP" wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==0.19.8"
du -sh .whl
ls -1 .whl
