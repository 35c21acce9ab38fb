#!/usr/bin/env bash
# Run B2 of session 10: generate.py, more interleaved rounds than session 9 (noise), no prefill rows.
set -u
W=/tmp/w2; mkdir -p $W
trap 'tar czf $OUT/run-b2.tar.gz -C $W .' EXIT
python3 -c "import pytest, xdist, rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat COMMIT ) > $W/info.txt
s=$SECONDS
timeout -s INT 560 python3 benchmarks/generate.py --providers sdpa eager patched patched-paged patched-graphs --repeats 7 --no-prefill --out $W > $W/generate.log 2>&1
echo "generate $? at $((SECONDS-s))" >> $W/info.txt
tail -60 $W/generate.log; cat $W/info.txt
