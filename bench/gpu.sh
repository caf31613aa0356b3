#!/usr/bin/env bash
# The one call that verifies and measures the GPU path on a bare GPU machine without network (SPEC §8):
#
#   bash bench/gpu.sh RESULTS_DIR              # GPU machine: at most 8 minutes of wall time
#   bash bench/gpu.sh RESULTS_DIR --rehearse   # every stage on this CPU: the op's CPU emulation, benches with
#                                              # --smoke, the sanitizer's driver without the sanitizer
#   ... --stages build,cuda-tests             # only the stages named (the target summary always closes)
#
# Stages, in order of what matters most: environment, wheels (the Python packages the machine lacks, from .whl/,
# which bench/wheels.sh fills), imports, build (the extension, MAX_JOBS=16, and its kernels' registers and
# shared memory), cuda-tests (pytest -m cuda), then the benches and the sanitizer in the order of LATER below
# (memcheck and racecheck: compute-sanitizer over bench/kernel_branches.py, which takes every launch branch of
# the Fisher kernels), and targets. Each stage runs under its own timeout inside one overall deadline and writes its log (a bench:
# its Markdown table to NAME.md, its JSON to NAME.json, its messages to NAME.log) into RESULTS_DIR as it goes,
# so a run cut short keeps what it finished; RESULTS_DIR/stages.md lists every stage's outcome. The last lines
# (also RESULTS_DIR/targets.md) give one line per target: figure, target, met or not.
set -uo pipefail

usage() { echo "usage: bash bench/gpu.sh RESULTS_DIR [--rehearse] [--stages NAME,NAME...]" >&2; exit 2; }
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
OUT=$1; shift
REHEARSE=0; ONLY=""
while [ $# -gt 0 ]; do
    case $1 in
        --rehearse) REHEARSE=1 ;;
        --stages) [ $# -ge 2 ] || usage; ONLY=",$2,"; shift ;;
        *) usage ;;
    esac
    shift
done

START=$(date +%s)
# 8 minutes on the GPU, less the summary's few seconds; the CPU rehearsal is slower and has no such limit.
DEADLINE=$((START + ${GPU_SH_SECONDS:-$((REHEARSE ? 7200 : 470))}))
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
SITE=/tmp/minisd-site  # where the carried wheels are installed (GPU machine)
for dir in "${CUDA_HOME:-}" /usr/local/cuda; do  # compute-sanitizer and cuobjdump live beside nvcc
    [ -n "$dir" ] && [ -d "$dir/bin" ] && PATH="$PATH:$dir/bin"
done
SLOWER=$((REHEARSE ? 5 : 1))  # the CPU rehearsal's stages get five times the GPU's time limits
export PYTHONUNBUFFERED=1 MAX_JOBS=16 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
[ "$REHEARSE" = 1 ] || export MINISD_CACHE=${MINISD_CACHE:-/tmp/minisd-cache}
FAILED=0

# The stages after the CUDA tests, most needed first: NAME TIMEOUT [ARGUMENTS...]. A bench writes
# RESULTS_DIR/NAME.json with its "targets"; "sanitizer" is compute-sanitizer's memcheck and racecheck. A new
# bench is one more line here.
LATER=(
    "kernel 70"
    "train_step 130"
    "sample 70"
    "cxr_ldm 60"
    "sanitizer"
    "fid 45"
)

printf '| stage | outcome | seconds |\n|---|---|---|\n' > "$OUT/stages.md"

record() {  # NAME OUTCOME [SECONDS]
    echo "| $1 | $2 | ${3:-} |" >> "$OUT/stages.md"
    echo "   $1: $2${3:+ (${3} s)}"
}

wanted() { [ -z "$ONLY" ] || [[ $ONLY == *",$1,"* ]]; }

# stage NAME TIMEOUT LOG COMMAND...: run COMMAND (stdout and stderr to LOG) within TIMEOUT and the deadline.
stage() {
    local name=$1 cap=$2 log=$3; shift 3
    wanted "$name" || return 0
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((cap * SLOWER < left ? cap * SLOWER : left))
    if [ "$limit" -lt 10 ]; then
        record "$name" "skipped: no time left"
        FAILED=1
        return 1
    fi
    echo "== $name (at most $limit s)"
    local began rc
    began=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
    rc=$?
    local outcome="ok"
    case $rc in
        0) ;;
        124|137) outcome="timed out after $limit s" ;;
        *) outcome="failed (exit $rc)" ;;
    esac
    [ "$rc" = 0 ] || FAILED=1
    record "$name" "$outcome, log $(basename "$log")" "$(($(date +%s) - began))"
    tail -n 3 "$log" | sed 's/^/   | /'
    return "$rc"
}

skip() {  # NAME REASON
    wanted "$1" && record "$1" "skipped: $2"
    return 0
}

# ---------------------------------------------------------------------------------------------- stages
stage environment 30 "$OUT/environment.log" bash -c '
    date -u; uname -a; nproc; free -g 2>/dev/null | head -2
    command -v nvidia-smi >/dev/null && nvidia-smi
    command -v nvcc >/dev/null && nvcc --version | tail -2
    command -v compute-sanitizer >/dev/null && compute-sanitizer --version | head -2
    '"$PY"' -c "import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"gpu\", torch.cuda.is_available() and torch.cuda.get_device_name())"
    git -C "'"$ROOT"'" log -1 --format="%H %s" 2>/dev/null; true'

if ! compgen -G ".whl/*.whl" > /dev/null; then
    wanted wheels && record wheels "failed: no .whl/*.whl (run bench/wheels.sh on a machine with network first)"
    wanted wheels && FAILED=1
elif [ "$REHEARSE" = 1 ]; then  # install them where this machine's own packages stay in charge
    SCRATCH=$(mktemp -d)
    stage wheels 60 "$OUT/wheels.log" "$PY" -m pip install --no-index --no-deps --no-compile --no-cache-dir \
        --target "$SCRATCH" .whl/*.whl
    rm -rf "$SCRATCH"
else
    stage wheels 60 "$OUT/wheels.log" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .whl/*.whl && export PYTHONPATH="$PYTHONPATH:$SITE"
fi

stage imports 60 "$OUT/imports.log" "$PY" -c '
import importlib
for name in ("minisd", "minisd.adapters.fused", "minisd.tokenizer", "diffusers", "open_clip", "pytorch_fid",
             "ftfy", "pydicom", "peft", "transformers"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", ""), module.__file__)
import minisd
print("tokenizer:", minisd.build("tiny").tokenizer(["a chest x-ray"])[0, :4].tolist())
'

if [ "$REHEARSE" = 1 ]; then
    stage build 120 "$OUT/build.log" "$PY" -c '
import sys, time
sys.path.insert(0, "tests")
import emulated_op
began = time.time()
print("emulated op (CPU):", emulated_op.cached_build().__file__, f"in {time.time() - began:.0f} s")'
else
    stage build 150 "$OUT/build.log" bash -c '"$0" -c "
import time, warnings, torch
from minisd.adapters import fused
warnings.simplefilter(\"error\")  # a fallback to the reference fails the stage
began = time.time()
ops = fused.selora_ops(torch.zeros(1, device=\"cuda\"))
print(\"built and self-checked in %.0f s:\" % (time.time() - began), ops.extension.__file__)
" && { find "$MINISD_CACHE/kernels" -name "*.so" -exec cuobjdump --dump-resource-usage {} \; || true; }' "$PY"
fi

# Only the files that hold GPU tests are collected: the others may import test-only references not carried.
mapfile -t CUDA_TESTS < <(grep -l "pytest.mark.cuda" tests/test_*.py)
if [ "${#CUDA_TESTS[@]}" = 0 ]; then
    skip cuda-tests "no test is marked cuda"
else
    stage cuda-tests 90 "$OUT/cuda-tests.log" "$PY" -m pytest -q -m cuda "${CUDA_TESTS[@]}" -rs -p no:cacheprovider \
        --junitxml="$OUT/cuda-tests.xml"
fi

sanitizer() {
    if [ "$REHEARSE" = 1 ]; then
        skip memcheck "no GPU (rehearsal); the driver runs on the CPU emulation instead"
        skip racecheck "no GPU (rehearsal)"
        stage kernel-branches 120 "$OUT/kernel-branches.log" "$PY" bench/kernel_branches.py --emulated
    elif ! command -v compute-sanitizer > /dev/null; then
        skip memcheck "compute-sanitizer not found"
        skip racecheck "compute-sanitizer not found"
        FAILED=1
    else
        # Only the op's own kernels are checked (a filter the tool cannot read is ignored: then all are); without
        # PyTorch's caching allocator every tensor is its own allocation, so an access past one is caught.
        for tool in "memcheck 60" "racecheck 90"; do
            read -r name cap <<< "$tool"
            stage "$name" "$cap" "$OUT/$name.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer \
                --tool "$name" --error-exitcode 1 --kernel-name kns=partials_kernel \
                --kernel-name kns=sum_samples_kernel "$PY" bench/kernel_branches.py
        done
    fi
}

bench_names=()
for entry in "${LATER[@]}"; do
    read -r name cap extra <<< "$entry"
    if [ "$name" = sanitizer ]; then
        sanitizer
        continue
    fi
    bench_names+=("$name")
    flags=()
    [ "$REHEARSE" = 1 ] && flags=(--smoke)
    [ "$REHEARSE" = 1 ] && [ "$name" = kernel ] && flags+=(--emulated)
    # shellcheck disable=SC2086  # extra holds a bench's own arguments, split on purpose
    stage "$name" "$cap" "$OUT/$name.log" bash -c '"$@" > "$0"' "$OUT/$name.md" \
        "$PY" "bench/$name.py" --json "$OUT/$name.json" "${flags[@]}" $extra
done

echo "== targets ($(($(date +%s) - START)) s since the start)"
"$PY" bench/targets.py "$OUT" "${bench_names[@]}"
exit "$FAILED"
