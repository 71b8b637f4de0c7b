#!/usr/bin/env bash
# Wheels a GPU machine without network needs for the training stack: `bash scripts/gpu_wheels.sh [DIR]` (default .whl).
# deepspeed is built here from its source release as a pure-Python wheel (DS_BUILD_OPS=0: no op compiled; on a GPU
# the stack uses none of DeepSpeed's fused kernels: its optimizer is torch's AdamW), then it, its dependencies the
# device image lacks, datasets', bitsandbytes and liger-kernel (--kernels auto; CUDA torch brings triton) are
# downloaded for the device's Python (3.12, x86-64). Carry DIR with the repository and install with
# `pip install --no-index --no-deps --target /tmp/site DIR/*.whl`.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.whl}"
mkdir -p "$out"
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
python -m pip download -q --no-deps --no-binary=:all: -d "$src" deepspeed==0.19.8
DS_BUILD_OPS=0 python -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$src"/deepspeed-*.tar.gz
if [ "${GPU_WHEELS_DEEPSPEED_ONLY:-}" != "1" ]; then
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$out" \
      hjson py-cpuinfo ninja msgpack einops \
      datasets dill multiprocess xxhash pyarrow fsspec \
      bitsandbytes==0.50.2 liger-kernel==0.8.5
fi
ls -l "$out"
