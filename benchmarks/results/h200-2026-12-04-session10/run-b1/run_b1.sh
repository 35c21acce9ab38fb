#!/usr/bin/env bash
# Run B1 of session 10: GPU tests of the files the forward/backward change touches, then host_overhead.py.
set -u
W=/tmp/w; mkdir -p $W
trap 'tar czf $OUT/run-b1.tar.gz -C $W .' EXIT
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat COMMIT ) > $W/info.txt
s=$SECONDS
timeout -s INT 75 python3 benchmarks/host_overhead.py > $W/host_overhead.log 2>&1
echo "host_overhead $? at $((SECONDS-s))" >> $W/info.txt
head -16 $W/host_overhead.log
timeout -s INT 400 python3 -m pytest -n 14 -q -rfEs -p no:cacheprovider tests/test_flash.py tests/test_launch.py tests/test_patch_gpu.py tests/test_packed.py tests/test_cache_graphs.py tests/test_flash_sinks.py > $W/tests.log 2>&1
echo "tests $? at $((SECONDS-s))" >> $W/info.txt; tail -8 $W/tests.log
cat $W/info.txt
