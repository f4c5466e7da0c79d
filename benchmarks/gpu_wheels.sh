#!/usr/bin/env bash
# Wheels that the lent GPU image (Python 3.12, torch 2.11, triton 3.6, transformers 5.17) lacks, for
# `lucid selftest gpu` (docs/training.md, "Running on GPUs"). Run here, on a machine with pip and this
# project's venv active; the wheels land in .whl/ (ignored by git), which the device call carries.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
# binary wheels for CPython 3.12 (pydantic-core is compiled)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl \
  megatron-core==0.16.1 webdataset==1.0.2 braceexpand hjson pydantic pydantic-core annotated-types \
  typing-inspection typing-extensions
# DeepSpeed ships only a source distribution: build a pure-Python wheel (its C++ ops JIT-build on use;
# the training path uses torch's AdamW and NCCL, so none is built on the GPU)
DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
ls -la .whl
du -sh .whl
