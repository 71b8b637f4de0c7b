#!/usr/bin/env bash
# One GPU lease, one command: the MoE cost at Qwen3-30B-A3B's layer shape in bf16 (ours vs PEFT vs the floor),
# benchmarks/gpu_check.py and benchmarks/gpu_e2e.py, each under its own time limit, results under OUT (default
# gpu_session). Wheels the device lacks go in .whl (scripts/gpu_wheels.sh); TOKENIZER_DIR for gpu_e2e.py.
#   OUT=$OUT TOKENIZER_DIR=tok bash scripts/gpu_session.sh        # on the GPU machine
#   SMOKE=1 OUT=/tmp/gpu_session bash scripts/gpu_session.sh      # tiny shapes on the CPU, to try it
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu_session}"
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
status=0
if [ "${SMOKE:-}" = "1" ]; then
    moe=(--shapes smoke --rounds 1 --steps 1 --seq-len 32); check=(--smoke --device cpu); e2e=(--small); limit=300
else
    moe=(--shapes gpu --device cuda --dtype bf16 --rounds 1 --steps 5 --micro-batch-size 8 --seq-len 1024)
    check=(); e2e=(); limit=240
fi
timeout "$limit" python3 benchmarks/moe_cost.py "${moe[@]}" --out "$out/moe_cost.json" > "$out/moe_cost.md" \
    2> "$out/moe_cost.log" || { echo "moe_cost failed or timed out: $out/moe_cost.log"; status=1; }
timeout "$limit" python3 benchmarks/gpu_check.py "${check[@]}" --out "$out/gpu_check" > "$out/gpu_check.log" 2>&1 \
    || { echo "gpu_check failed or timed out: $out/gpu_check.log"; status=1; }
if [ -n "${TOKENIZER_DIR:-}" ]; then
    timeout "$limit" python3 benchmarks/gpu_e2e.py "$out/e2e" "$TOKENIZER_DIR" "${e2e[@]}" > "$out/gpu_e2e.log" 2>&1 \
        || { echo "gpu_e2e failed or timed out: $out/gpu_e2e.log"; status=1; }
fi
cat "$out/moe_cost.md"
exit "$status"
