#!/usr/bin/env bash
# Run C of session 10: packed.py (training rows on quality_llama.py's data too), bare decode-step rows, D=64 1k kernels eagerly.
set -u
W=/tmp/w3; mkdir -p $W
trap 'tar czf $OUT/run-c.tar.gz -C $W .' EXIT
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .clean/COMMIT 2>/dev/null ) > $W/info.txt
s=$SECONDS
timeout -s INT 200 python3 benchmarks/packed.py --out $W > $W/packed.log 2>&1
echo "packed $? at $((SECONDS-s))" >> $W/info.txt; tail -28 $W/packed.log
timeout -s INT 110 python3 benchmarks/generate.py --no-generate --providers sdpa eager patched patched-graphs --out $W --no-plot > $W/decode-step.log 2>&1
echo "decode-step $? at $((SECONDS-s))" >> $W/info.txt; tail -14 $W/decode-step.log
timeout -s INT 80 python3 benchmarks/kernel_speed.py --d 64 --n 1024 --modes noncausal causal --providers ours sdpa-flash sdpa-cudnn --no-gqa --out $W --no-plot > $W/kernels-eager.log 2>&1
echo "kernels-eager $? at $((SECONDS-s))" >> $W/info.txt; tail -12 $W/kernels-eager.log
cat $W/info.txt
