#!/usr/bin/env bash
# The accelerator benchmark in one command, as it runs on a GPU machine that holds jax, torch and
# transformers but not the rest of what mae_jax imports, and can download nothing:
#   bash launch/device_wheels.sh          # here, once: the missing wheels into .whl/
#   bash benchmarks/accelerator.sh        # there: ViT-B/16 and ViT-L/16, bf16, ours and PyTorch
#   bash benchmarks/accelerator.sh --variants=vit_base --steps=20    # any benchmark flag
# Installs .whl/*.whl into a scratch folder without an index, names the device, runs
# `python -m mae_jax.benchmarks.accelerator` and keeps its table (accelerator.log) and JSON line
# (accelerator.jsonl, appended) in $OUT, or in benchmarks/accelerator/ when OUT is unset.
# Then the TPU step model (mae_jax.tpu.step_model) is held against the measured step of each of
# STEP_MODEL_VARIANTS (default: vit_base vit_large, 64 images a device) with
# `python -m mae_jax.benchmarks.step_model_check`, its JSON lines in step_model.jsonl;
# STEP_MODEL_VARIANTS="" skips it, STEP_MODEL_ARGS replaces its flags.
# PYTHON: the interpreter (default python3, the one that holds torch on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile \
    --target "$site" .whl/*.whl
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
out=${OUT:-benchmarks/accelerator}
mkdir -p "$out"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$python" -m mae_jax.benchmarks.accelerator --out="$out/accelerator.jsonl" "$@" 2>&1 \
  | tee "$out/accelerator.log"
for variant in ${STEP_MODEL_VARIANTS-vit_base vit_large}; do
  # shellcheck disable=SC2086  # STEP_MODEL_ARGS is a list of flags
  "$python" -m mae_jax.benchmarks.step_model_check --config="configs/pretrain.py:$variant" \
    ${STEP_MODEL_ARGS---config.batch_size=64 --steps=20} 2>&1 | tee -a "$out/step_model.log" \
    | tail -n 1 >> "$out/step_model.jsonl"
done
