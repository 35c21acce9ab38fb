#!/usr/bin/env bash
# Session 14 run M: main with s12-align merged (the superset of s12-fma, s12-masks, s12-specialise
# and s12-align, the fastest of run K) on the GPU: its flash tests, then D128 16k against cuDNN and
# Flex from a cold Triton cache (first-call compile seconds recorded), the compile cost of the kernel
# before the merge for comparison, and packed.py against Flex and the sdpa fallback.
# From the repository root on the CPU machine:
#   rm -rf .clean && mkdir .clean && git archive HEAD | tar -x -C .clean && cp -r .whl .clean/
#   git rev-parse HEAD > .clean/COMMIT; mkdir .clean/old
#   for f in _flash_triton.py flash.py; do git show 44969e5:hf_attn_patch/kernels/$f > .clean/old/$f; done
# then the device tool with carry [".clean"]: bash .clean/benchmarks/results/h200-2026-12-05-session14/run_m.sh
set -u
W=/tmp/wm; mkdir -p $W
trap 'tar czf $OUT/run-m.tar.gz -C $W .' EXIT
cd .clean
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat COMMIT ) > $W/info.txt
rm -rf /tmp/t-old && mkdir /tmp/t-old && tar cf - --exclude=.whl --exclude=old . | tar xf - -C /tmp/t-old
cp old/*.py /tmp/t-old/hf_attn_patch/kernels/
s=$SECONDS
step() { # name timeout dir args...
  local name=$1 to=$2 d=$3; shift 3
  if [ $((SECONDS-s+to)) -gt 575 ]; then echo "$name skipped at $((SECONDS-s))" >> $W/info.txt; return; fi
  (cd $d && PYTHONPATH=/tmp/site:$d timeout -s INT $to python3 "$@" > $W/$name.log 2>&1)
  echo "$name rc=$? at $((SECONDS-s))" >> $W/info.txt
}
step tests 250 $PWD -m pytest -n 15 -q -rfEs -p no:cacheprovider tests/test_flash.py tests/test_packed.py \
  tests/test_flash_sinks.py tests/test_kernels_reliability.py
tail -3 $W/tests.log
export TRITON_CACHE_DIR=/tmp/cold-merged
step k128 130 $PWD benchmarks/kernel_speed.py --d 128 --n 16384 --modes noncausal causal \
  --providers ours sdpa-cudnn sdpa-flash flex --no-gqa --out $W/merged
grep -E "│ 128|ours /" $W/k128.log | tail -8
export TRITON_CACHE_DIR=/tmp/cold-old
step k128-old 60 /tmp/t-old benchmarks/kernel_speed.py --d 128 --n 16384 --modes causal --providers ours \
  --no-gqa --no-plot --out $W/old
export TRITON_CACHE_DIR=/tmp/cold-merged
step packed 60 $PWD benchmarks/packed.py --no-training --out $W/merged
grep -E "│" $W/packed.log | tail -5
cat $W/info.txt
