#!/usr/bin/env bash
# Compiles paper configs' train steps for their documented slice, strictly one after another
# (each takes ~10 CPU-minutes on a 2-core host): the "Fit on TPU slices" table of
# docs/performance.md.
#
#   benchmarks/aot_all.sh OUTDIR NAME:STAGE[:TOPOLOGY] ...   # e.g. fusion_3b:stage2:v5p-128
#
# Writes OUTDIR/NAME_STAGE.json and .log; the first config also writes its optimized HLO
# (OUTDIR/NAME_STAGE.hlo.txt). Extra flags for every run: AOT_FLAGS="--config.KEY=VALUE ...".
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
out=$1; shift
mkdir -p "$out"
first=1
for spec in "$@"; do
  IFS=: read -r name stage topo <<<"$spec"
  topo=${topo:-v5p-128}
  base="$out/${name}_${stage}"
  hlo=()
  if [[ $first == 1 ]]; then hlo=(--hlo_out "$base.hlo.txt"); first=0; fi
  echo "$(date -u +%FT%TZ) start $spec" >>"$out/batch.log"
  /usr/bin/time -v nice -n 5 python -m fusion_jax.aot --config "experiments/$name.py:$stage" \
      --topology "$topo" --out "$base.json" "${hlo[@]}" ${AOT_FLAGS:-} >"$base.log" 2>&1
  rc=$?
  echo "$(date -u +%FT%TZ) done $spec rc=$rc" >>"$out/batch.log"
done
