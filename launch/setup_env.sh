#!/usr/bin/env bash
# Installs mae_jax and what it needs on a fresh Debian/Ubuntu machine (or TPU VM).
#   bash launch/setup_env.sh          # the package and the embedded Fashion-MNIST data
#   bash launch/setup_env.sh --tpu    # also libtpu (jax[tpu]): runs on TPU VMs, and compiles
#                                     # TPU programs anywhere (mae_jax.tools.scaling --topology)
#   bash launch/setup_env.sh --test   # also torch (CPU build), transformers, pytest and libtpu
set -euo pipefail
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; }
with_test=0
with_tpu=0
for arg in "$@"; do
  case "$arg" in
    --test) with_test=1; with_tpu=1 ;;
    --tpu) with_tpu=1 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown option: $arg" >&2; usage >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."

# Fashion-MNIST (the embedded default) ships as a Debian package: no internet download needed.
# The tests also lint the launch scripts with shellcheck.
debs=()
[ -d /usr/share/datasets/fashion-mnist ] || debs+=(dataset-fashion-mnist)
[ "$with_test" -eq 1 ] && ! command -v shellcheck >/dev/null && debs+=(shellcheck)
if [ "${#debs[@]}" -gt 0 ] && command -v apt-get >/dev/null; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq || true
  $sudo_cmd apt-get install -y -qq "${debs[@]}" \
    || echo "warning: could not install ${debs[*]}; Fashion-MNIST then comes from TFDS's download" >&2
fi

pip_install() { python3 -m pip install -q --disable-pip-version-check "$@"; }
extras=()
[ "$with_test" -eq 1 ] && extras+=(test torch)
# libtpu of the jax version installed (the extra pins jax[tpu] to the same range as jax).
[ "$with_tpu" -eq 1 ] && extras+=(tpu)
# The CPU build of torch, pinned: a plain `torch` pulls several GB of CUDA wheels.
[ "$with_test" -eq 1 ] && pip_install "torch==2.13.0"
if [ "${#extras[@]}" -gt 0 ]; then
  pip_install -e ".[$(IFS=,; echo "${extras[*]}")]"
else
  pip_install -e .
fi
