#!/usr/bin/env bash
# Run from the repository root on the CPU machine: builds .clean (main's HEAD) with the session 12
# kernel branches as variants, for the device tool (carry [".clean"]; command: bash .clean/run_k.sh).
set -eu
rm -rf .clean && mkdir .clean && git archive HEAD | tar -x -C .clean && cp -r .whl .clean/
git rev-parse HEAD > .clean/COMMIT
for b in s12-fma s12-masks s12-specialise s12-align s12-lazy; do
  mkdir -p .clean/variants/$b
  for f in hf_attn_patch/kernels/_flash_triton.py hf_attn_patch/kernels/flash.py tests/test_flash.py; do
    git show $b:$f > .clean/variants/$b/$(basename $f)
  done
  git rev-parse --short $b >> .clean/variants/$b/COMMIT
done
cp benchmarks/results/h200-2026-12-04-session12/run_k.sh .clean/run_k.sh
