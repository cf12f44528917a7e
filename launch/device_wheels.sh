#!/usr/bin/env bash
# Prepares .whl/: the wheels that mae_jax's accelerator benchmark needs and the GPU machine's
# image lacks (launch/device_image.txt lists what the image has), at the versions of
# constraints.txt, for its Python 3.12 on x86-64. benchmarks/accelerator.sh installs them there
# without an index. Fails if the bundle outgrows its budget (the machine takes at most 64 MiB of
# the working tree; the bundle keeps to 20).
#   bash launch/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
# What the image lacks, of what the benchmark imports (tests/test_accelerator.py rehearses the
# run in a venv of the image's packages only, so a missing one fails there, not on the device).
missing=(ml_collections)
budget_mib=20
rm -rf .whl
mkdir -p .whl
for name in "${missing[@]}"; do
  pin=$(grep -i -E "^${name//[-_]/[-_]}==" constraints.txt) \
    || { echo "device_wheels.sh: $name has no version in constraints.txt" >&2; exit 1; }
  "$python" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d .whl "$pin"
done
size_kib=$(du -sk .whl | cut -f1)
if [ "$size_kib" -gt $((budget_mib * 1024)) ]; then
  echo "device_wheels.sh: .whl/ holds ${size_kib} KiB, over the ${budget_mib} MiB budget" >&2
  exit 1
fi
wheels=(.whl/*.whl)
echo "device_wheels.sh: .whl/ holds ${#wheels[@]} wheel(s), ${size_kib} KiB: ${wheels[*]}"
