#!/usr/bin/env bash
# Session 8, run N: fused dQ by TMA reductions against the two-pass backward; GPU tests of both first.
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import rich, xdist" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
mkdir -p $OUT/n
{ nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader; cat COMMIT; } > $OUT/n/info.txt 2>&1
timeout 130 python3 -m pytest -m gpu -n 14 -q -rfE -p no:cacheprovider tests/test_flash.py -k "gpu_both_backwards or gpu_options" tests/test_packed.py > $OUT/n/gpu-tests.log 2>&1; echo "rc=$?" >> $OUT/n/gpu-tests.log
cd benchmarks
timeout 120 python3 packed.py --providers ours ours-two-pass flex --no-training --out $OUT/n > $OUT/n/packed.log 2>&1; echo "rc=$?" >> $OUT/n/packed.log
timeout 150 python3 kernels.py --d 128 --n 16384 --modes noncausal causal --providers ours ours-two-pass sdpa-cudnn --no-plot --out $OUT/n > $OUT/n/kernels.log 2>&1; echo "rc=$?" >> $OUT/n/kernels.log
cd ..
tail -4 $OUT/n/gpu-tests.log; grep -B2 -A12 "packed attention" $OUT/n/packed.log | tail -12; grep -A8 "TFLOP" $OUT/n/kernels.log | head -30; tail -2 $OUT/n/kernels.log
