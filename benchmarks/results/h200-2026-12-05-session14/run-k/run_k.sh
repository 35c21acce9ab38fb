#!/usr/bin/env bash
# Session 12 run K (written for the next GPU session; run J was lost when the machine stopped
# answering). main against the session 12 kernel branches, one process per variant and benchmark:
#   s12-fma        forward: row max over unscaled scores, one fused multiply-add per score
#   s12-masks      + masked steps test two per-row (per-key in dK/dV) bounds computed once
#   s12-specialise + the kernels specialise on q_len / k_len (divisible by 16, or 1)
#   s12-align      + dK/dV's empty query ranges at a block boundary
#   s12-lazy       s12-fma + the forward rescales its accumulator only when a row max rose > 2^8
# D128 16k fwd+bwd (two rounds), window W=1024, packed.py attention rows; then GPU tests on
# s12-align (the superset of all but lazy) with the time left.
set -u
W=/tmp/w11; mkdir -p $W
trap 'tar czf $OUT/run-k.tar.gz -C $W .' EXIT
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .clean/.whl/*.whl >/dev/null 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .clean/COMMIT; cat .clean/variants/*/COMMIT ) > $W/info.txt
s=$SECONDS
VARIANTS="main s12-fma s12-masks s12-specialise s12-align s12-lazy"
for v in $VARIANTS; do
  T=/tmp/t-$v; rm -rf $T; mkdir -p $T; (cd .clean && tar cf - --exclude=variants --exclude=.whl . ) | tar xf - -C $T
  if [ $v != main ]; then
    cp .clean/variants/$v/_flash_triton.py .clean/variants/$v/flash.py $T/hf_attn_patch/kernels/
    cp .clean/variants/$v/test_flash.py $T/tests/
  fi
done
step() { # name timeout variant args...
  local name=$1 to=$2 v=$3; shift 3
  if [ $((SECONDS-s+to)) -gt 570 ]; then echo "$v $name skipped at $((SECONDS-s))" >> $W/info.txt; return; fi
  mkdir -p $W/$v
  (cd /tmp/t-$v && PYTHONPATH=/tmp/site:/tmp/t-$v timeout -s INT $to python3 "$@" > $W/$v/$name.log 2>&1)
  echo "$v $name rc=$? at $((SECONDS-s))" >> $W/info.txt; grep -E "│ 128|│ ours" $W/$v/$name.log | tail -4
}
for v in $VARIANTS; do
  step k128-1 45 $v benchmarks/kernel_speed.py --d 128 --n 16384 --modes noncausal causal --providers ours --no-gqa --no-plot --out $W/$v
done
for v in $VARIANTS; do
  step win 40 $v benchmarks/kernel_speed.py --d 128 --n 16384 --modes window --windows 1024 --providers ours --no-gqa --no-plot --out $W/$v
done
for v in $VARIANTS; do step packed 40 $v benchmarks/packed.py --no-training --providers ours --out $W/$v; done
for v in main s12-align; do
  step k128-2 45 $v benchmarks/kernel_speed.py --d 128 --n 16384 --modes noncausal causal --providers ours --no-gqa --no-plot --out $W/$v
done
rest=$((560-(SECONDS-s)))
step tests $rest s12-align -m pytest -n 14 -q -rfEs -p no:cacheprovider tests/test_flash.py tests/test_flash_sinks.py tests/test_packed.py tests/test_kernels_reliability.py
tail -4 $W/s12-align/tests.log
cat $W/info.txt
