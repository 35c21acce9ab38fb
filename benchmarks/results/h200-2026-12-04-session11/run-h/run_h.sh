#!/usr/bin/env bash
# Session 11 run H: main with dK/dV's 32x128 config: GPU tests (tuned configs, reliability, packed), packed.py
# attention rows, kernel_speed D128 16k and D64 1k beside the peers.
set -u
W=/tmp/w8; mkdir -p $W
trap 'tar czf $OUT/run-h.tar.gz -C $W .' EXIT
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .clean/COMMIT ) > $W/info.txt
s=$SECONDS
step() { local name=$1 to=$2; shift 2
  if [ $((SECONDS-s+to)) -gt 425 ]; then echo "$name skipped at $((SECONDS-s))" >> $W/info.txt; return; fi
  timeout -s INT $to "$@" > $W/$name.log 2>&1; echo "$name rc=$? at $((SECONDS-s))" >> $W/info.txt; }
step tests 190 python3 -m pytest -n 14 -q -rfEs -p no:cacheprovider tests/test_kernels_autotune_gpu.py tests/test_kernels_reliability.py tests/test_packed.py
tail -4 $W/tests.log
step packed 60 python3 benchmarks/packed.py --no-training --out $W
grep -E "│" $W/packed.log | tail -6
step k128 100 python3 benchmarks/kernel_speed.py --d 128 --n 16384 --modes noncausal causal --providers ours sdpa-cudnn flex --no-gqa --out $W --no-plot
grep -E "│ 128|ours /" $W/k128.log
step k64 60 python3 benchmarks/kernel_speed.py --d 64 --n 1024 --modes noncausal causal --providers ours sdpa-flash sdpa-cudnn --no-gqa --out $W --no-plot
grep -E "│  64|ours /" $W/k64.log
cat $W/info.txt
