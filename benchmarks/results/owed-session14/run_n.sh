#!/usr/bin/env bash
# Session 14 run N (written on 2026-12-05 for the next GPU session: this session's device time
# ran out after runs K, M and L). Two device calls of under 10 minutes each:
#   bash .clean/benchmarks/results/owed-session14/run_n.sh kernels
#     1. the flash, packed, sinks and kernel-reliability GPU tests in full on main (run M's
#        250 s limit stopped 8 of 224, none failed);
#     2. the branch s14-bounds (document bounds computed by 512-position programs side by side
#        instead of one program a row): its bounds test on the GPU, then packed.py's attention
#        rows, main and the branch, one process each. Merge the branch if it is not slower.
#   bash .clean/benchmarks/results/owed-session14/run_n.sh generate
#     issue 12's generate and bare decode-step rows on main, with the experiment
#     `patched-paged-unsplit` beside `patched-paged`: the same paged cache, but eager decode
#     steps never split the context (one launch a layer fewer, the merge). If it wins at B = 1
#     and B = 16, make one partition the eager decode's choice up to the length where it stops.
# From the repository root on the CPU machine:
#   rm -rf .clean && mkdir .clean && git archive HEAD | tar -x -C .clean && cp -r .whl .clean/ && git rev-parse HEAD > .clean/COMMIT
#   mkdir -p .clean/variants/s14-bounds && git show s14-bounds:hf_attn_patch/kernels/_flash_triton.py > .clean/variants/s14-bounds/_flash_triton.py
#   git show s14-bounds:tests/test_packed.py > .clean/variants/s14-bounds/test_packed.py
# then the device tool with carry [".clean"] and one of the two commands above.
set -u
MODE=${1:-kernels}
W=/tmp/wn-$MODE; mkdir -p $W
trap 'tar czf $OUT/run-n-$MODE.tar.gz -C $W .' EXIT
cd .clean
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat COMMIT ) > $W/info.txt
s=$SECONDS
if [ "$MODE" = kernels ]; then
  timeout -s INT 300 python3 -m pytest -n 16 -q -rfEs -p no:cacheprovider --durations=12 tests/test_flash.py \
    tests/test_packed.py tests/test_flash_sinks.py tests/test_kernels_reliability.py > $W/tests.log 2>&1
  echo "tests rc=$? at $((SECONDS-s)) s" >> $W/info.txt; tail -16 $W/tests.log
  V=/tmp/t-bounds; rm -rf $V; mkdir -p $V; tar cf - --exclude=.whl --exclude=variants . | tar xf - -C $V
  cp variants/s14-bounds/_flash_triton.py $V/hf_attn_patch/kernels/; cp variants/s14-bounds/test_packed.py $V/tests/
  (cd $V && PYTHONPATH=/tmp/site:$V python3 -c "from hf_attn_patch.kernels import _flash_triton as f
print('variant kernels:', f.__file__, 'bounds block', getattr(f, '_BOUNDS_BLOCK', None))") >> $W/info.txt 2>&1
  (cd $V && PYTHONPATH=/tmp/site:$V timeout -s INT 90 python3 -m pytest -q -p no:cacheprovider tests/test_packed.py \
    -k bounds > $W/bounds-tests.log 2>&1); echo "bounds tests rc=$? at $((SECONDS-s)) s" >> $W/info.txt
  for round in 1 2; do
    for d in $PWD $V; do
      name=$([ $d = $PWD ] && echo main || echo s14-bounds)-$round
      (cd $d && PYTHONPATH=/tmp/site:$d timeout -s INT 60 python3 benchmarks/packed.py --no-training --providers ours \
        --out $W/$name > $W/packed-$name.log 2>&1); echo "packed $name rc=$? at $((SECONDS-s)) s" >> $W/info.txt
      grep -E "│ +ours" $W/packed-$name.log
    done
  done
else
  timeout -s INT 560 python3 benchmarks/generate.py --providers sdpa eager patched patched-paged \
    patched-paged-unsplit patched-graphs --repeats 3 --no-prefill --out $W > $W/generate.log 2>&1
  echo "generate rc=$? at $((SECONDS-s)) s" >> $W/info.txt; tail -45 $W/generate.log
fi
cat $W/info.txt
