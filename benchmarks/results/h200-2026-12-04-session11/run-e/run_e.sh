#!/usr/bin/env bash
# Session 11 run E: main against the three kernel variants (branch files in .clean/variants/).
set -u
W=/tmp/w5; mkdir -p $W
trap 'tar czf $OUT/run-e.tar.gz -C $W .' EXIT
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .clean/.whl/*.whl >/dev/null 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .clean/COMMIT ) > $W/info.txt
s=$SECONDS
trees=""
for v in main s10-masked-loops-unpipelined s10-causal-leading-loop s11-both; do
  T=/tmp/t-$v; rm -rf $T; mkdir -p $T; (cd .clean && tar cf - --exclude=variants --exclude=.whl . ) | tar xf - -C $T
  [ $v = main ] || cp .clean/variants/$v.py $T/hf_attn_patch/kernels/_flash_triton.py
  trees="$trees $v"
done
step() { # name timeout tree args...
  local name=$1 to=$2 v=$3; shift 3
  if [ $((SECONDS-s+to)) -gt 585 ]; then echo "$name skipped at $((SECONDS-s))" >> $W/info.txt; return; fi
  mkdir -p $W/$v
  (cd /tmp/t-$v && PYTHONPATH=/tmp/site:/tmp/t-$v timeout -s INT $to python3 "$@" --out $W/$v > $W/$v/$name.log 2>&1)
  echo "$v $name rc=$? at $((SECONDS-s))" >> $W/info.txt; grep -E "ours|cudnn|flex" $W/$v/$name.log | tail -8
}
for v in $trees; do step k128 110 $v benchmarks/kernel_speed.py --d 128 --n 16384 --modes noncausal causal --providers ours --no-gqa --no-plot; done
step k128peers 80 main benchmarks/kernel_speed.py --d 128 --n 16384 --modes noncausal causal --providers sdpa-cudnn flex --no-gqa --no-plot
for v in $trees; do step packed 45 $v benchmarks/packed.py --no-training --providers ours; done
step ablation 70 main benchmarks/forward_ablation.py
cat $W/info.txt
