#!/usr/bin/env bash
# Session 13 run L (written on 2026-12-04 for the next GPU session; this session was lent no GPU).
# Checks on the GPU what session 13 built on the CPU: the paged cache's shared blocks (beam search,
# repeated prompts), steps of several tokens (continued conversations, assisted decoding) and crop.
#   1. the cache's GPU tests: every test of these files runs on CUDA there (the `device` fixture);
#   2. benchmarks/paged.py --sections beams memory: beam search time and K/V held, the default
#      cache against the paged one (eager and with CUDA graphs), on the Llama-1B shape.
# From the repository root on the CPU machine:
#   rm -rf .clean && mkdir .clean && git archive HEAD | tar -x -C .clean && cp -r .whl .clean/ && git rev-parse HEAD > .clean/COMMIT
# then the device tool with carry [".clean"] and: bash .clean/benchmarks/results/owed-session13/run_l.sh
set -u
W=/tmp/wl; mkdir -p $W
trap 'tar czf $OUT/run-l.tar.gz -C $W .' EXIT
cd .clean
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat COMMIT ) > $W/info.txt
s=$SECONDS
timeout -s INT 220 python3 -m pytest -n 15 -q -rfEs -p no:cacheprovider tests/test_cache_generate.py \
  tests/test_cache_graphs.py tests/test_cache_reliability.py tests/test_cache_allocator.py tests/test_paged.py \
  tests/test_streaming.py > $W/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-s)) s" >> $W/info.txt; tail -3 $W/tests.log
timeout -s INT 200 python3 benchmarks/paged.py --sections beams memory --out $W > $W/paged.log 2>&1
echo "paged rc=$? at $((SECONDS-s)) s" >> $W/info.txt; grep -A8 "beam search" $W/paged.log
cat $W/info.txt
