#!/usr/bin/env bash
# Session 12 run I: what session 11 owed. The per-config GPU test, D64 1k replayed from CUDA graphs,
# window rows beside Flex (with causal for the W/causal ratio), then the rest of run H's GPU tests.
set -u
W=/tmp/w9; mkdir -p $W
trap 'tar czf $OUT/run-i.tar.gz -C $W .' EXIT
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .clean/COMMIT ) > $W/info.txt
s=$SECONDS
step() { local name=$1 to=$2; shift 2
  if [ $((SECONDS-s+to)) -gt 540 ]; then echo "$name skipped at $((SECONDS-s))" >> $W/info.txt; return; fi
  timeout -s INT $to "$@" > $W/$name.log 2>&1; echo "$name rc=$? at $((SECONDS-s))" >> $W/info.txt; }
step percfg 120 python3 -m pytest -n 14 -q -rfEs -p no:cacheprovider tests/test_kernels_autotune_gpu.py -k each_shipped_config
tail -3 $W/percfg.log
step k64g 70 python3 benchmarks/kernel_speed.py --d 64 --n 1024 --modes noncausal causal --providers ours sdpa-flash sdpa-cudnn --no-gqa --cuda-graphs --out $W --no-plot
grep -E "│  64|ours /" $W/k64g.log
step win 110 python3 benchmarks/kernel_speed.py --d 128 --n 16384 --modes causal window --providers ours flex --no-gqa --out $W --no-plot
grep -E "│ 128|ours /" $W/win.log
rest=$((530-(SECONDS-s)))
step tests $rest python3 -m pytest -n 14 -q -rfEs -p no:cacheprovider tests/test_kernels_autotune_gpu.py tests/test_kernels_reliability.py tests/test_packed.py -k "not each_shipped_config"
tail -4 $W/tests.log
cat $W/info.txt
