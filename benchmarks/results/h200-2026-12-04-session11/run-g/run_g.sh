#!/usr/bin/env bash
# Session 11 run G: per-config backward timings (tune_sweep --candidates backward) on main; the ALIGNED
# branch (.clean/aligned) against main, non-causal D128 16k; GPU tests of the ALIGNED branch.
set -u
W=/tmp/w7; mkdir -p $W
trap 'tar czf $OUT/run-g.tar.gz -C $W .' EXIT
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .clean/COMMIT .clean/aligned/COMMIT ) > $W/info.txt
s=$SECONDS
M=$PWD/.clean; A=$PWD/.clean/aligned
step() { # name timeout tree args...
  local name=$1 to=$2 T=$3; shift 3
  if [ $((SECONDS-s+to)) -gt 590 ]; then echo "$name skipped at $((SECONDS-s))" >> $W/info.txt; return; fi
  (cd $T && PYTHONPATH=/tmp/site:$T timeout -s INT $to python3 "$@" > $W/$name.log 2>&1)
  echo "$name rc=$? at $((SECONDS-s))" >> $W/info.txt
}
step tune-backward 230 $M benchmarks/tune_sweep.py --candidates backward --out $W
grep -A40 "each candidate" $W/tune-backward.log | head -30
for r in 1 2; do
  step k128nc-main-$r 45 $M benchmarks/kernel_speed.py --d 128 --n 16384 --modes noncausal --providers ours --no-gqa --no-plot --out $W/main
  step k128nc-aligned-$r 45 $A benchmarks/kernel_speed.py --d 128 --n 16384 --modes noncausal --providers ours --no-gqa --no-plot --out $W/aligned
done
grep -h "│ 128" $W/k128nc-*.log
step tests-aligned 200 $A -m pytest -n 14 -q -rfEs -p no:cacheprovider tests/test_flash.py tests/test_kernels_reliability.py tests/test_flash_sinks.py
tail -5 $W/tests-aligned.log
cat $W/info.txt
