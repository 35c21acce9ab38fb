#!/usr/bin/env bash
# Session 11 run F: GPU tests on branch s10-causal-leading-loop's kernel, then repeated main / B / C timings.
set -u
W=/tmp/w6; mkdir -p $W
trap 'tar czf $OUT/run-f.tar.gz -C $W .' EXIT
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .clean/.whl/*.whl >/dev/null 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .clean/COMMIT ) > $W/info.txt
s=$SECONDS
for v in main s10-causal-leading-loop s11-both; do
  T=/tmp/t-$v; rm -rf $T; mkdir -p $T; (cd .clean && tar cf - --exclude=variants --exclude=.whl . ) | tar xf - -C $T
  [ $v = main ] || cp .clean/variants/$v.py $T/hf_attn_patch/kernels/_flash_triton.py
done
(cd /tmp/t-s10-causal-leading-loop && PYTHONPATH=/tmp/site:$PWD timeout -s INT 330 python3 -m pytest -n 14 -q -rfEs -p no:cacheprovider tests/test_flash.py tests/test_flash_sinks.py tests/test_packed.py tests/test_kernels_reliability.py tests/test_launch.py tests/test_patch_gpu.py > $W/tests.log 2>&1)
echo "tests rc=$? at $((SECONDS-s))" >> $W/info.txt; tail -15 $W/tests.log
step() { # name timeout tree args...
  local name=$1 to=$2 v=$3; shift 3
  if [ $((SECONDS-s+to)) -gt 585 ]; then echo "$name $v skipped at $((SECONDS-s))" >> $W/info.txt; return; fi
  mkdir -p $W/$v
  (cd /tmp/t-$v && PYTHONPATH=/tmp/site:/tmp/t-$v timeout -s INT $to python3 "$@" --out $W/$v > $W/$v/$name.log 2>&1)
  echo "$v $name rc=$? at $((SECONDS-s))" >> $W/info.txt; grep -E "│ 128" $W/$v/$name.log | tail -4
}
for r in 1 2 3; do for v in s11-both s10-causal-leading-loop main; do step k128-$r 45 $v benchmarks/kernel_speed.py --d 128 --n 16384 --modes noncausal causal --providers ours --no-gqa --no-plot; done; done
cat $W/info.txt
