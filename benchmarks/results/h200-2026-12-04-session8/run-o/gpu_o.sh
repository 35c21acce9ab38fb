#!/usr/bin/env bash
# Session 8, run O: every kernel-facing GPU test on main (kernels as of e01b29d), then ncu_profile.py's packed case.
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PATH=/usr/local/cuda/bin:$PATH
python3 -c "import rich, xdist" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
mkdir -p $OUT/o
{ nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader; cat COMMIT;
  python3 -c "import torch,triton,transformers;print(torch.__version__,triton.__version__,transformers.__version__)"; } > $OUT/o/info.txt 2>&1
T=tests; start=$SECONDS
timeout 440 python3 -m pytest -n 14 -q -rfE -p no:cacheprovider $T/test_flash_sinks.py $T/test_launch.py $T/test_flash.py $T/test_kernels_autotune_gpu.py $T/test_kernels_reliability.py $T/test_packed.py $T/test_paged.py $T/test_paged_sinks.py $T/test_patch_gpu.py $T/test_streaming.py $T/test_cache_reliability.py $T/test_cache_continuous_batching.py $T/test_cache_graphs.py > $OUT/o/gpu-kernel-tests.log 2>&1
echo "rc=$? after $((SECONDS-start))s" >> $OUT/o/gpu-kernel-tests.log
cd benchmarks; start=$SECONDS
timeout 120 python3 ncu_profile.py --cases packed --providers ours flex --out $OUT/o > $OUT/o/ncu.log 2>&1; echo "rc=$? after $((SECONDS-start))s" >> $OUT/o/ncu.log
tail -3 $OUT/o/gpu-kernel-tests.log; tail -12 $OUT/o/ncu.log
