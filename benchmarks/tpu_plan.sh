#!/usr/bin/env bash
# The README's TPU plan: real TPU compiles (libtpu, compile-only devices) of the paper's runs
# and of the current generations' slices.
# Each line is one `mae_jax.tools.scaling` invocation writing benchmarks/tpu_plan/NAME.jsonl;
# existing files are kept, so a stopped run continues where it was (remove a stale NAME.lock
# left by a killed run). Two or more copies can run at once: each takes the next free compile.
# 5-30 minutes per large compile on a 2-core CPU; compiles are cached (MAE_JAX_TPU_COMPILE_CACHE),
# so a plan asked again only lowers. Then: python benchmarks/tpu_plan_table.py
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/tpu_plan
mkdir -p "$out"
plan() {  # plan NAME ARGS...: one compile unless NAME.jsonl exists or another copy has it
  local name=$1; shift
  [[ -s "$out/$name.jsonl" ]] && return 0
  mkdir "$out/$name.lock" 2>/dev/null || return 0
  echo "=== $(date +%T) $name: $*" >&2
  python -m mae_jax.tools.scaling --out="$out/$name.jsonl.tmp" "$@" >/dev/null || true
  if [[ -s "$out/$name.jsonl.tmp" ]]; then mv "$out/$name.jsonl.tmp" "$out/$name.jsonl"; fi
  rmdir "$out/$name.lock"
}
# choose NAME ARGS...: the plan that chooses (scaling --choose, as launch/tpu.sh plan): every
# candidate's JSON line in choose_NAME.jsonl, its ranking in choose_NAME.md.
choose() {
  local name=$1; shift
  plan "choose_$name" --choose --markdown="$out/choose_$name.md" "$@"
}
pre=configs/pretrain.py
# Current generations at the paper's batch (4096), one realistic slice each: ViT-L, then ViT-H.
for s in v5p-128 tpu7x-128 v6e-256 v5litepod-256; do
  choose "vit_large_$s" --topology=$s --config=$pre:vit_large
done
for s in v5p-128 tpu7x-128 v6e-256 v5litepod-256; do
  choose "vit_huge_$s" --topology=$s --config=$pre:vit_huge
done
# The cost model's time came back negative on tpu7x-128, v6e-256 and v5e-256: the same per-device
# batch on one host of each.
for s in v6e-8 tpu7x-8; do
  plan "vit_large_one_host_$s" --topology=$s --config=$pre:vit_large --batch_per_device=32
done
# Two v5e-256 slices over the data-center network (multi-slice): the bytes that cross it.
plan vit_large_v5litepod-256_2slices --topology=v5litepod-256 --num_slices=2 --config=$pre:vit_large
# Table 2 of the paper: 128 TPU-v3 cores, batch 4096, 800 epochs.
plan t2_vit_large_dec8 --topology=v3-128 --config=$pre:vit_large
plan t2_vit_large_mask_tokens --topology=v3-128 --config=$pre:vit_large --config.model.encoder_mask_tokens=True
plan t2_vit_large_dec1 --topology=v3-128 --config=$pre:vit_large --config.model.decoder_depth=1
plan t2_vit_huge_dec8 --topology=v3-128 --config=$pre:vit_huge
# Data parallel against FSDP, remat on and off.
plan vit_large_v3-128_fsdp --topology=v3-128 --config=$pre:vit_large --config.mesh.data=1 --config.mesh.fsdp=-1
plan vit_base_v3-128 --topology=v3-128 --config=$pre:vit_base
plan vit_huge_v3-128_data --topology=v3-128 --config=$pre:vit_huge --config.mesh.data=-1 --config.mesh.fsdp=1 --config.model.remat=False
plan vit_large_v3-128_remat --topology=v3-128 --config=$pre:vit_large --config.model.remat=True
plan vit_large_v4-64 --topology=v4-64 --config=$pre:vit_large
# Fine-tuning (batch 1024) and the linear probe (batch 16384).
plan finetune_vit_large_v3-128 --topology=v3-128 --config=configs/finetune.py:vit_large
plan linprobe_vit_large_v3-128 --topology=v3-128 --config=configs/linprobe.py:vit_large
plan vit_huge_v4-128 --topology=v4-128 --config=$pre:vit_huge
plan vit_huge_v3-256 --topology=v3-256 --config=$pre:vit_huge
plan vit_huge_v3-512 --topology=v3-512 --config=$pre:vit_huge
plan vit_base_v4-64 --topology=v4-64 --config=$pre:vit_base
plan finetune_vit_huge_v3-128 --topology=v3-128 --config=configs/finetune.py:vit_huge
