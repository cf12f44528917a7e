#!/usr/bin/env bash
# Our MAE train step against transformers' PyTorch ViTMAE on this CPU, float32 and bfloat16, in one
# run: mae_jax.benchmarks.compare_torch for each (model, batch, dtype), steps interleaved with torch's.
# One JSON line per comparison goes to benchmarks/cpu_stack/<date>_<cpu>.jsonl; then the table.
#   bash benchmarks/cpu_stack.sh            # with the venv active
# The float32 rows take about 10 min on 2 quiet cores. On a CPU without AVX512_BF16, PyTorch's
# bfloat16 autocast step is 10-20x slower than its float32 one (ViT-B: over 30 min); results in
# benchmarks/cpu_stack.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1 | tr -c 'A-Za-z0-9\n' '_')
out=benchmarks/cpu_stack/$(date +%Y-%m-%d)_${cpu}.jsonl
: > "$out"
for dtype in float32 bfloat16; do
  python -m mae_jax.benchmarks.compare_torch --model=mae_vit_tiny_patch4 --batch_size=256 --steps=8 \
    --dtype="$dtype" | tail -1 >> "$out"
  python -m mae_jax.benchmarks.compare_torch --model=mae_vit_base_patch16 --batch_size=8 --steps=6 \
    --dtype="$dtype" | tail -1 >> "$out"
done
python benchmarks/cpu_stack_table.py "$out"
