#!/usr/bin/env bash
# The "Speed on accelerators" table (docs/performance.md; README has its headline rows) on one
# NVIDIA GPU: benchmarks/step_mfu.py at FUSION 3B width (bf16, full remat, 4096 tokens/row),
# unpacked and packed, next to the PyTorch Phi-3 baseline, each framework in its own process.
#
#   benchmarks/gpu_run.sh [OUT_DIR] [extra step_mfu.py flags, e.g. --batch 4 --layers 16]
#
# Environment: PARITY=0 / MEMORY=0 skip the attention checks, TABLE=0 the table run, PACKED=N
# samples per packed row (default 4; 0: no packed run), REMAT_ROWS="POLICY:BATCH[:TOWER[:CHUNKS]]
# ..." the lighter-remat rows (default dots_with_no_batch_dims_and_attention:4, the best row so
# far; CHUNKS: step_mfu's --loss-chunks, default 1),
# DEADLINE_S a time limit that rows are fitted under, ROW_HLO=0 no compiled HLO of the remat rows.
# Output in OUT_DIR: gpu_run.log (everything printed), step_mfu*.json, hlo/*.hlo.txt.gz (the
# table's runs, and hlo/ROW/unpacked.hlo.txt.gz per remat row: it names the profile's fusions).
#
# Python: $PYTHON (default python3) must import jax with a CUDA backend, flax, optax,
# ml_collections, torch with CUDA and transformers; the repository root goes on PYTHONPATH (the
# package need not be installed). When it does not:
#   - WHEELS=DIR installs from a folder of wheels carried to the machine (no network needed):
#     pip install --no-index --find-links DIR for the packages below;
#   - otherwise it tries PyPI: jax[cuda12] at the version pinned in requirements.txt, plus torch
#     and transformers (needs network).
# A GPU machine without network must therefore bring its packages: preinstalled in its image, or
# a wheel folder/venv carried with the session (CUDA jax + torch are several GB; a transport
# limited to tens of MiB cannot carry them, so use an image that has them). The jax version that
# ran is written into the JSON next to the pinned one; a difference is printed, not hidden.
#
# On the workplace's lent H100/H200 machines (jax, flax, optax, torch, transformers in the image,
# no network), ml_collections is the one package missing: carry its wheel, e.g. in an ignored
# .whl/ folder, and start with
#   pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site bash benchmarks/gpu_run.sh OUT
# Times measured on an H200: the attention parity check 40 s; the table 100 s unpacked only
# (PACKED=0, with the PyTorch run and the profile), 5.5 minutes with the packed run and the
# memory check; each remat row 75-90 s at 2 or 4 rows (a FUSION compile is 40-65 s of it; one
# that runs out of memory fails in about 75 s); the parity check at the tower's shape
# (attention_parity.py --seq 730 --heads 16 --kv_heads 16 --head_dim 72) 40 s. A machine's
# start adds about 35 s.
#
# Depth: the full 32 LLM layers need about 16 bytes per parameter (fp32 weights, gradients, two
# AdamW moments: ~70 GB for FUSION 3B) plus activations; on a GPU under 100 GiB the LLM is cut to
# 16 layers (the table says so). Override with --layers.
set -euo pipefail
SECONDS=0  # DEADLINE_S counts from here
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
OUT=${1:-bench_out}
shift $(( $# > 0 ? 1 : 0 ))
mkdir -p "$OUT"
PIN=$(sed -n 's/^jax==//p' requirements.txt)

check() {
  "$PY" - <<'EOF'
import jax, flax, optax, ml_collections, torch, transformers
assert jax.default_backend() == "gpu", f"jax backend is {jax.default_backend()}, not gpu"
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("jax", jax.__version__, "| torch", torch.__version__, "| transformers",
      transformers.__version__, "|", jax.devices()[0].device_kind)
EOF
}

if ! check; then
  pkgs=("jax[cuda12]==$PIN" "flax" "optax" "ml_collections" "torch" "transformers")
  if [[ -n "${WHEELS:-}" ]]; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" "${pkgs[@]}"
  else
    "$PY" -m pip install -q "${pkgs[@]}"
  fi
  check
fi

JAXV=$("$PY" -c 'import jax; print(jax.__version__)')
[[ "$JAXV" == "$PIN" ]] || echo "note: jax $JAXV here, $PIN pinned in requirements.txt"

MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
LAYERS=()
if (( MEM_MIB < 100 * 1024 )); then LAYERS=(--layers 16); fi

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export PYTHONUNBUFFERED=1
# One log for everything below (the lent machines bring back a handful of files).
exec > >(tee -a "$OUT/gpu_run.log") 2>&1

# A row starts only if its estimated cost fits before DEADLINE_S (seconds since this script
# started; 0: no deadline), so a run under a hard time limit ends with whole rows.
DEADLINE_S=${DEADLINE_S:-0}
fits() {  # fits SECONDS NAME
  if (( DEADLINE_S > 0 && SECONDS + $1 > DEADLINE_S )); then
    echo "SKIPPED $2: ~$1 s would pass the ${DEADLINE_S} s deadline (at ${SECONDS} s)"
    return 1
  fi
}

# cuDNN's attention (both routes: packed rows' mask, one-sample rows' lengths) against the fp32
# XLA path at Phi-3's head shape, bf16; reported, not fatal, so the timings still come back.
if [[ "${PARITY:-1}" == 1 ]] && fits 40 "attention parity"; then
  "$PY" benchmarks/attention_parity.py --seq 2048 || echo "ATTENTION PARITY FAILED (above)"
fi
# One decoder layer's compiled temp memory, XLA vs cuDNN attention (compile only, seconds).
if [[ "${MEMORY:-1}" == 1 ]] && fits 40 "attention memory"; then
  "$PY" benchmarks/attention_memory.py --dtype bfloat16 --impls xla,cudnn || true
fi
# The table: full remat, unpacked and packed (PACKED samples per row; 0: unpacked only), and the
# PyTorch baseline. The traces (about 10 MB per run) go to a scratch folder; the kernel-class
# breakdown and the slowest kernels are printed and written into the JSON, and each run's
# compiled HLO (which names those kernels' fusions) into OUT_DIR/hlo.
PACKED=${PACKED:-4}
PROFILE_DIR=${PROFILE_DIR:-/tmp/fusion_step_profile}
if [[ "${TABLE:-1}" == 1 ]] && fits $(( PACKED ? 300 : 190 )) "the table"; then
  "$PY" benchmarks/step_mfu.py --isolate --steps 5 "${LAYERS[@]}" --packed "$PACKED" \
    --profile "$PROFILE_DIR" --hlo "$OUT/hlo" "$@" --out "$OUT/step_mfu.json" \
    || echo "TABLE RUN FAILED (above)"
fi
# Lighter remat than the table's full remat (the HFU - MFU gap is the recompute): FUSION only,
# one sample per row. REMAT_ROWS lists POLICY:BATCH[:TOWER_ATTENTION[:LOSS_CHUNKS]] rows (""
# skips them; TOWER_ATTENTION is step_mfu's --vision-attention, default auto; LOSS_CHUNKS its
# --loss-chunks, default 1); a row that does not fit the device's memory fails alone.
for row in ${REMAT_ROWS-dots_with_no_batch_dims_and_attention:4}; do
  IFS=: read -r policy batch tower chunks <<< "$row"
  tower=${tower:-auto}
  chunks=${chunks:-1}
  fits 110 "remat $policy batch $batch tower $tower loss chunks $chunks" || continue
  name="${policy}_b${batch}_tower_$tower"
  if (( chunks > 1 )); then name="${name}_chunks$chunks"; fi
  "$PY" benchmarks/step_mfu.py --notorch --packed 0 --steps 5 --remat "$policy" \
    --batch "$batch" --vision-attention "$tower" --loss-chunks "$chunks" \
    --profile "$PROFILE_DIR/$row" --hlo "$([[ "${ROW_HLO:-1}" == 1 ]] && echo "$OUT/hlo/$name")" \
    "${LAYERS[@]}" "$@" --out "$OUT/step_mfu_remat_$name.json" \
    || echo "REMAT ROW $row FAILED (above)"
done
for json_path in "$OUT"/step_mfu*.json; do
  [[ -e "$json_path" ]] || continue
  "$PY" - "$json_path" "$JAXV" "$PIN" <<'EOF'
import json, sys
path, ran, pinned = sys.argv[1:]
report = json.load(open(path))
report.update(jax_version=ran, jax_pinned=pinned)
json.dump(report, open(path, "w"), indent=1)
EOF
done
echo "gpu_run.sh done in ${SECONDS} s"
