#!/usr/bin/env bash
# Session 14 run N (written on 2026-12-05 for the next GPU session: this session's device time
# ran out after runs K, M and L). Two things, one command of under 10 minutes:
#   1. the flash, packed, sinks and kernel-reliability GPU tests in full on the merged kernel
#      (run M's 250 s limit stopped 8 of 224, none failed);
#   2. issue 12's generate rows on main, with the experiment `patched-paged-unsplit` beside
#      `patched-paged`: the same paged cache, but eager decode steps never split the context
#      (one launch a layer fewer, the merge). If unsplit wins at B = 1 and B = 16, make one
#      partition the eager decode's choice up to the context length where it stops winning.
# From the repository root on the CPU machine:
#   rm -rf .clean && mkdir .clean && git archive HEAD | tar -x -C .clean && cp -r .whl .clean/ && git rev-parse HEAD > .clean/COMMIT
# then the device tool with carry [".clean"]: bash .clean/benchmarks/results/owed-session14/run_n.sh
set -u
W=/tmp/wn; mkdir -p $W
trap 'tar czf $OUT/run-n.tar.gz -C $W .' EXIT
cd .clean
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat COMMIT ) > $W/info.txt
s=$SECONDS
timeout -s INT 290 python3 -m pytest -n 16 -q -rfEs -p no:cacheprovider --durations=12 tests/test_flash.py \
  tests/test_packed.py tests/test_flash_sinks.py tests/test_kernels_reliability.py > $W/tests.log 2>&1
echo "tests rc=$? at $((SECONDS-s)) s" >> $W/info.txt; tail -16 $W/tests.log
timeout -s INT $((565-(SECONDS-s))) python3 benchmarks/generate.py --providers sdpa eager patched patched-paged \
  patched-paged-unsplit patched-graphs --repeats 5 --no-prefill --out $W > $W/generate.log 2>&1
echo "generate rc=$? at $((SECONDS-s)) s" >> $W/info.txt; tail -45 $W/generate.log
cat $W/info.txt
