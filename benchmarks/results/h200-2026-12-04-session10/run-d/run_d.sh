#!/usr/bin/env bash
set -u
W=/tmp/w4; mkdir -p $W
trap 'tar czf $OUT/run-d.tar.gz -C $W .' EXIT
python3 -c "import rich" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
( nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; cat .clean/COMMIT 2>/dev/null ) > $W/info.txt
s=$SECONDS
timeout -s INT 270 python3 benchmarks/results/h200-2026-12-04-session10/run-d/tma_ws_probe.py --out $W > $W/probe.log 2>&1
echo "probe $? at $((SECONDS-s))" >> $W/info.txt
tail -22 $W/probe.log; cat $W/info.txt
