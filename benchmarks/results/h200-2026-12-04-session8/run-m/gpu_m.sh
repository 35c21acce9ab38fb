#!/usr/bin/env bash
# Session 8, run M: the fused-dQ backward against the two-pass one, beside the peers; then GPU tests.
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import rich, xdist" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
mkdir -p $OUT/m
{ nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader; cat COMMIT;
  python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)"; } > $OUT/m/info.txt 2>&1
cd benchmarks
timeout 170 python3 packed.py --providers ours ours-two-pass flex --no-training --out $OUT/m > $OUT/m/packed.log 2>&1; echo "rc=$?" >> $OUT/m/packed.log
timeout 250 python3 kernels.py --d 128 --n 16384 --providers ours ours-two-pass sdpa-cudnn flex --out $OUT/m > $OUT/m/kernels.log 2>&1; echo "rc=$?" >> $OUT/m/kernels.log
cd ..
timeout 150 python3 -m pytest -m gpu -n 14 -q -rfE -p no:cacheprovider tests/test_flash.py tests/test_packed.py tests/test_flash_sinks.py > $OUT/m/gpu-tests.log 2>&1; echo "rc=$?" >> $OUT/m/gpu-tests.log
tail -5 $OUT/m/packed.log; grep -A40 "TFLOP" $OUT/m/kernels.log | head -60; tail -3 $OUT/m/gpu-tests.log
