#!/usr/bin/env bash
# The CUDA check of issue 11, for a bare GPU machine with no registry access, in under ten minutes:
# installs the carried wheels, records the machine, runs the CUDA tests, then `smolalign bench` against
# TRL and TRL + Liger on SmolLM2-135M- and -1.7B-shaped models (random weights), writing as it goes:
#
#   $OUT/gpu_report.md   command, GPU, versions, test summary, one bench table per stage
#   $OUT/pytest.log      the CUDA tests' output
#   $OUT/bench.log       the benchmark's output (the worker processes' errors included)
#   $OUT/bench.json      every stage's bench.json, by stage name
#
# Prepare here first with scripts/gpu_wheels.sh, then run through the device tool:
#   run(command="bash scripts/gpu_check.sh", carry=["scripts/gpu-carry"], timeout_s=600)
# Environment: GPU_CHECK_SECONDS (default 480) is the time after which no new stage starts and a
# running one is stopped; GPU_CHECK_STAGES picks stages (default: all, in the order below);
# GPU_CHECK_TESTS=0 skips the tests; for a dry run on a machine that has the packages,
# GPU_CHECK_INSTALL=0 installs no wheels and GPU_CHECK_BENCH_ARGS replaces the bench arguments.
# Nothing here changes the GPU's settings.
set -uo pipefail
cd "$(dirname "$0")/.."

BUDGET=${GPU_CHECK_SECONDS:-480}
OUT=${OUT:-$PWD/gpu-check-out}
CARRY=scripts/gpu-carry
PYTHON=${PYTHON:-python3}
STAGES=${GPU_CHECK_STAGES:-"135m-full-dpo 1.7b-full-dpo 135m-full-orpo 1.7b-lora-dpo 135m-lora-dpo 1.7b-full-orpo"}
read -r -a BENCH <<<"${GPU_CHECK_BENCH_ARGS:-"--steps 8 --warmup_steps 3 --batch_size 16 --max_length 1024 --device cuda --frameworks smolalign,trl,trl_liger"}"
mkdir -p "$OUT" /tmp/gpu-check
REPORT=$OUT/gpu_report.md

left() { echo $((BUDGET - SECONDS)); }
say() { echo "$*" | tee -a "$REPORT"; }

# --- 1. what the image lacks, from the carried wheels; the tokenizer into a fresh cache ---
if [ "${GPU_CHECK_INSTALL:-1}" = 0 ]; then
    export PYTHONPATH=$PWD
elif [ -d "$CARRY/wheels" ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$CARRY"/wheels/*.whl || { echo "installing the carried wheels failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    echo "no $CARRY/wheels: run scripts/gpu_wheels.sh here first and carry $CARRY" >&2
    export PYTHONPATH=$PWD
fi
export SMOLALIGN_CACHE=/tmp/gpu-check/cache
mkdir -p "$SMOLALIGN_CACHE"
[ -d "$CARRY/cache" ] && cp -r "$CARRY"/cache/. "$SMOLALIGN_CACHE"/
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TQDM_DISABLE=1

# --- 2. the machine ---
{
    echo "# smolalign on CUDA: scripts/gpu_check.sh"
    echo
    echo "command: \`bash scripts/gpu_check.sh\` (git $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%Y-%m-%dT%H:%MZ))"
    echo
    echo '```'
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PYTHON" - <<'PY' 2>&1
import importlib.metadata, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| bf16 native", torch.cuda.is_bf16_supported(including_emulation=False))
for name in ("transformers", "accelerate", "peft", "trl", "liger-kernel", "datasets", "triton", "pyarrow", "fsspec"):
    try:
        print(f"{name} {importlib.metadata.version(name)}", end="; ")
    except importlib.metadata.PackageNotFoundError:
        print(f"{name} missing", end="; ")
print()
PY
    echo '```'
} >"$REPORT"
cat "$REPORT"

# --- 3. the CUDA tests: test_cuda.py, and the device-agnostic tests' CUDA cases (every layout vs padded) ---
if [ "${GPU_CHECK_TESTS:-1}" != 0 ]; then
    tests_seconds=$(( $(left) < 240 ? $(left) : 240 ))
    per_test=()  # a hanging test must not take the whole budget (pytest-timeout is on the GPU image)
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=150)
    timeout --kill-after=10 "$tests_seconds" "$PYTHON" -m pytest -v -s -rfE -p no:cacheprovider "${per_test[@]}" \
        -m "cuda and not slow" --durations=5 tests/test_cuda.py tests/core/test_layouts.py >"$OUT/pytest.log" 2>&1
    status=$?
    say ""
    say "## CUDA tests (exit status $status$([ $status = 124 ] && echo ": stopped after ${tests_seconds}s"))"
    say ""
    say '```'
    grep -E " (PASSED|FAILED|ERROR|SKIPPED)|passed|failed| in [0-9.]+s|^E  |measured .* kB per token" \
        "$OUT/pytest.log" | cut -c1-200 | tail -40 | tee -a "$REPORT"
    say '```'
fi

# --- 4. the benchmark, stage by stage while time is left (a stage is one model, LoRA or not, one algorithm) ---
stage_args() {  # stage name -> bench arguments
    local model=${1%%-*} rest=${1#*-}
    local tuning=${rest%%-*} algorithm=${rest#*-}
    echo "--model_config smollm2-$model --algorithm $algorithm $([ "$tuning" = lora ] && echo --lora)"
}
minimum_seconds() {  # a stage that cannot finish in less is not started
    case $1 in 1.7b-*) echo 150 ;; *) echo 90 ;; esac
}
say ""
say "## smolalign bench: ${BENCH[*]}"
for stage in $STAGES; do
    if (($(left) < $(minimum_seconds "$stage"))); then
        say ""
        say "### $stage: not run ($(left)s left)"
        continue
    fi
    # shellcheck disable=SC2046
    timeout --kill-after=10 "$(left)" "$PYTHON" -m smolalign bench "${BENCH[@]}" $(stage_args "$stage") \
        --output_dir "/tmp/gpu-check/bench/$stage" >>"$OUT/bench.log" 2>&1
    status=$?
    say ""
    if [ -f "/tmp/gpu-check/bench/$stage/bench.md" ]; then
        say "### $stage"
        say ""
        tee -a "$REPORT" <"/tmp/gpu-check/bench/$stage/bench.md"
    else
        say "### $stage: failed (exit status $status), see bench.log"
        for log in "/tmp/gpu-check/bench/$stage"/logs/*.log; do  # the worker processes' last words
            [ -f "$log" ] && { echo "--- $stage: $(basename "$log")"; tail -15 "$log"; } >>"$OUT/bench.log"
        done
    fi
done

"$PYTHON" - "$OUT/bench.json" /tmp/gpu-check/bench <<'PY'
import json, pathlib, sys
stages = {p.parent.name: json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[2]).glob("*/bench.json"))}
pathlib.Path(sys.argv[1]).write_text(json.dumps(stages, indent=1))
PY
say ""
say "done in ${SECONDS}s"
