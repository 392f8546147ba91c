#!/usr/bin/env bash
# One bounded GPU check for a bare H100/H200 with its preinstalled CUDA torch (issue 34).
#
#   benchmarks/gpu_check.sh [OUT_DIR] [--dry-run-cpu]        (OUT_DIR defaults to $OUT, else ./gpu_check_out)
#   GPU_CHECK_DRY_RUN_CPU=1 benchmarks/gpu_check.sh OUT_DIR    (the same, by environment)
#
# Stages, in priority order, each under its own `timeout`, each writing its files into OUT_DIR as it ends:
#   env        nvidia-smi, python/torch/CUDA versions, pip list                   -> env.txt, pip-list.txt
#   deps       installs what is missing of the project's packages from wheels in $WHEELS (default
#              benchmarks/wheels/), offline, never touching torch                   -> deps.log
#   pytest-*   the CUDA-only tests (pytest -m gpu, then the CUDA test files/ids)   -> pytest-*.xml / .log
#   bench-*    python -m benchmarks.bench --size full --device cuda, one variant per run -> bench-*.json / .md / .log
#   summary    summary.tsv (stage, rc, seconds, limit) and summary.md (the step tables from the JSON files)
# The whole script stays within GPU_CHECK_BUDGET_S (default 470 s): a stage gets the smaller of its own limit
# and what is left, and is skipped (rc "skipped") when under MIN_STAGE_S remain.
# --dry-run-cpu runs the same sequence at --size mid --device cpu with few steps (a rehearsal on any machine).
#
# Wheels for an offline machine (pure-python ones fit any Python; pick --python-version of the GPU machine):
#   pip download -d benchmarks/wheels --only-binary=:all: --python-version 3.12 \
#       diffusers transformers safetensors einops gguf pytest sentencepiece protobuf huggingface_hub
# (no torch: the machine's own CUDA build is used as is; numpy/pillow are usually there already).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2

OUT_DIR="${OUT:-$ROOT/gpu_check_out}"
DRY="${GPU_CHECK_DRY_RUN_CPU:-0}"
for arg in "$@"; do
    case "$arg" in
        --dry-run-cpu) DRY=1 ;;
        -h|--help) sed -n 2,24p "$0"; exit 0 ;;
        -*) echo "unknown option $arg" >&2; exit 2 ;;
        *) OUT_DIR="$arg" ;;
    esac
done
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

PY="${PYTHON:-python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
MIN_STAGE="${MIN_STAGE_S:-40}"
RESERVE=15  # kept back for the summary
WHEELS="${WHEELS:-$ROOT/benchmarks/wheels}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ "$DRY" = 1 ]; then
    SIZE=mid; DEVICE=cpu; STEPS="${STEPS:-2}"; REPEATS=1; WARMUP=0; FEW=1
else
    SIZE=full; DEVICE=cuda; STEPS="${STEPS:-8}"; REPEATS=3; WARMUP=1; FEW=2
fi

T0=$(date +%s)
printf 'stage\trc\tseconds\tlimit_s\n' > "$OUT_DIR/summary.tsv"
{
    echo "gpu_check started $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
    echo "mode: $([ "$DRY" = 1 ] && echo "dry run on CPU (--size mid --device cpu)" || echo "GPU (--size full --device cuda)")"
    echo "budget ${BUDGET}s, repo $ROOT, out $OUT_DIR, python $PY"
} > "$OUT_DIR/README.txt"

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }

# stage NAME MAX_SECONDS STDOUT_FILE CMD...   (stderr and stdout both go to NAME.log unless STDOUT_FILE is given)
stage() {
    local name=$1 max=$2 stdout=$3; shift 3
    local remain limit start rc secs
    remain=$(( $(left) - RESERVE ))
    limit=$(( remain < max ? remain : max ))
    if [ "$limit" -lt "$MIN_STAGE" ]; then
        printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >> "$OUT_DIR/summary.tsv"
        echo "[gpu_check] $name skipped: ${remain}s left of the budget"
        return 0
    fi
    echo "[gpu_check] $name (limit ${limit}s): $*"
    start=$(date +%s.%N)
    if [ -n "$stdout" ]; then
        timeout -k 10 "$limit" "$@" > "$OUT_DIR/$stdout" 2> "$OUT_DIR/$name.log"
    else
        timeout -k 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    fi
    rc=$?
    secs=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$secs" "$limit" >> "$OUT_DIR/summary.tsv"
    echo "[gpu_check] $name: rc=$rc in ${secs}s$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo ' (TIMED OUT)')"
    return 0
}

# ---------------------------------------------------------------- env
env_report() {
    echo "== date"; date -u
    echo "== nvidia-smi"; timeout 20 nvidia-smi 2>&1 || echo "(no nvidia-smi)"
    echo "== cpu"; grep -m1 "model name" /proc/cpuinfo 2>/dev/null; nproc
    echo "== memory"; free -g 2>/dev/null
    echo "== disk"; df -h "$OUT_DIR" /tmp 2>/dev/null
    echo "== python"
    "$PY" - <<'EOF'
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            print("device", i, torch.cuda.get_device_name(i), "capability", torch.cuda.get_device_capability(i))
except Exception as e:
    print("torch import failed:", e)
for name in ("diffusers", "transformers", "safetensors", "einops", "gguf", "pytest", "numpy", "PIL",
             "sentencepiece", "flash_attn", "flash_attn_interface", "sageattention", "triton"):
    try:
        mod = __import__(name)
        print(name, getattr(mod, "__version__", "?"))
    except Exception as e:
        print(name, "MISSING", type(e).__name__)
EOF
}
export -f env_report
export PY OUT_DIR WHEELS
stage env 60 env.txt bash -c env_report
timeout 30 "$PY" -m pip list > "$OUT_DIR/pip-list.txt" 2>&1

# ---------------------------------------------------------------- deps (offline wheels)
install_missing() {
    # module -> distribution, for what the engine, the tests and the benchmark import
    local missing=() pair mod dist
    for pair in safetensors:safetensors einops:einops transformers:transformers diffusers:diffusers gguf:gguf \
                pytest:pytest numpy:numpy PIL:pillow sentencepiece:sentencepiece google.protobuf:protobuf \
                huggingface_hub:huggingface_hub; do
        mod=${pair%%:*}; dist=${pair#*:}
        "$PY" -c "import $mod" >/dev/null 2>&1 || missing+=("$dist")
    done
    echo "missing: ${missing[*]:-(none)}"
    [ ${#missing[@]} -eq 0 ] && return 0
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "no wheels in $WHEELS: cannot install ${missing[*]} offline"
        return 3
    fi
    # never let pip replace the machine's CUDA torch
    "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$OUT_DIR/torch-constraint.txt" 2>/dev/null \
        || : > "$OUT_DIR/torch-constraint.txt"
    "$PY" -m pip install --no-index --find-links "$WHEELS" -c "$OUT_DIR/torch-constraint.txt" "${missing[@]}"
    local rc=$?
    for pair in safetensors einops transformers diffusers gguf pytest; do
        "$PY" -c "import $pair; print('$pair', getattr($pair, '__version__', '?'))" 2>&1
    done
    return $rc
}
export -f install_missing
stage deps 120 "" bash -c install_missing

# ---------------------------------------------------------------- the CUDA-only tests
# No test carries the `gpu` marker yet (pytest exits 5, "no tests ran"); the CUDA tests skip themselves without
# CUDA and live in these files and ids.
CUDA_TESTS=(
    tests/test_fast_paths.py
    tests/test_bench.py
    tests/test_checkpoint_transformer.py::test_scaled_mm_path_on_gpu
    tests/test_lora.py::test_on_the_gpu_the_original_weight_waits_in_host_memory
    tests/test_small_model_training.py::test_training_runs_on_the_gpu
)
PYTEST=("$PY" -m pytest -p no:cacheprovider -q -rA --durations=15)
stage pytest-gpu-marker 45 "" "${PYTEST[@]}" -m gpu --junitxml="$OUT_DIR/pytest-gpu-marker.xml" tests
stage pytest-cuda 150 "" "${PYTEST[@]}" --junitxml="$OUT_DIR/pytest-cuda.xml" "${CUDA_TESTS[@]}"

# ---------------------------------------------------------------- the benchmark, one variant per run
BENCH=("$PY" -m benchmarks.bench --size "$SIZE" --device "$DEVICE" --stat median)
# ours exact vs diffusers (identical weights), the reference-cache fast mode, fp8 weights (_scaled_mm on 8.9+)
stage bench-exact-fast-fp8 210 bench-exact-fast-fp8.md "${BENCH[@]}" --modes exact,fast,fp8 --steps "$STEPS" \
    --repeats "$REPEATS" --warmup "$WARMUP" --json "$OUT_DIR/bench-exact-fast-fp8.json"
# torch.compile per block and CUDA-graph replay (compile time is inside the first call, not the timed ones)
stage bench-compile-graphs 180 bench-compile-graphs.md "${BENCH[@]}" --modes exact,compile,graphs --no-diffusers \
    --steps "$FEW" --repeats "$REPEATS" --warmup "$WARMUP" --json "$OUT_DIR/bench-compile-graphs.json"
# block offload: the weights in host memory, two blocks at a time on the device
stage bench-offload 150 bench-offload.md "${BENCH[@]}" --modes exact,offload --no-diffusers --steps "$FEW" \
    --repeats "$(( REPEATS > 2 ? 2 : REPEATS ))" --warmup "$WARMUP" --json "$OUT_DIR/bench-offload.json"

# ---------------------------------------------------------------- summary
summarize() {
    "$PY" - "$OUT_DIR" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
lines = ["# gpu_check summary", "", "| stage | rc | seconds | limit |", "|---|---|---:|---:|"]
for row in (out / "summary.tsv").read_text().splitlines()[1:]:
    lines.append("| " + " | ".join(row.split("\t")) + " |")
for f in sorted(out.glob("bench-*.json")):
    r = json.loads(f.read_text())
    c = r["config"]
    lines += ["", f"## {f.stem}: {c['size']} on {c['device_name']} ({c['dtype']}), torch {c['torch']}, "
              f"diffusers {c['diffusers']}, {c['img_tokens']} img + {c['txt_tokens']} txt tokens, {c['steps']} steps",
              "", "| impl | mode | s/step | TFLOP/s | peak MiB | error |", "|---|---|---:|---:|---:|---|"]
    for row in r["step"]:
        e = row.get("error")
        err = f"rel L2 {e['rel_l2']:.1e}, max {e['max_abs']:.1e} vs {row['error_vs']}" if e else "-"
        lines.append(f"| {row['impl']} | {row['mode']} | {row['s_per_step']:.4g} | {row['tflops']:.3g} | "
                     f"{row['peak_mib']:.0f} | {err} |")
    lines += ["", "| impl | mode | s/edit | denoise s | VAE enc s | VAE dec s | peak MiB | error |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    for row in r["edit"]:
        e = row.get("error")
        err = f"rel L2 {e['rel_l2']:.1e}, image <= {e.get('image_max_abs_255')}/255 vs {row['error_vs']}" if e else "-"
        lines.append(f"| {row['impl']} | {row['mode']} | {row['s_per_edit']:.4g} | {row['denoise_s']:.4g} | "
                     f"{row['vae_encode_s']:.3g} | {row['vae_decode_s']:.3g} | {row['peak_mib']:.0f} | {err} |")
for f in sorted(out.glob("pytest-*.xml")):
    import xml.etree.ElementTree as ET
    root = ET.parse(f).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    a = suite.attrib
    lines += ["", f"{f.stem}: {a.get('tests')} tests, {a.get('failures')} failures, {a.get('errors')} errors, "
              f"{a.get('skipped')} skipped, {a.get('time')} s"]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}
export -f summarize
timeout 30 bash -c summarize > "$OUT_DIR/summary.log" 2>&1 \
    || echo "[gpu_check] summary failed, see summary.log"
TOTAL=$(( $(date +%s) - T0 ))
echo "total ${TOTAL}s of a ${BUDGET}s budget" | tee -a "$OUT_DIR/README.txt"
cat "$OUT_DIR/summary.tsv"
