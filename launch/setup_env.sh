#!/usr/bin/env bash
# Installs mae_jax and what it needs on a fresh Debian/Ubuntu machine (or TPU VM).
#   bash launch/setup_env.sh          # the package and the embedded Fashion-MNIST data
#   bash launch/setup_env.sh --tpu    # also libtpu (jax[tpu]): runs on TPU VMs, and compiles
#                                     # TPU programs anywhere (mae_jax.tools.scaling --topology)
#   bash launch/setup_env.sh --test   # also pytest, libtpu, the tests' PyTorch reference, the
#                                     # local Cloud Storage server of the gs:// tests, and the
#                                     # venvs of the oldest JAX and of the GPU machine's image
# mae_jax goes into the active venv ($VIRTUAL_ENV, as launch/tpu.sh makes on TPU workers) when
# its Python is 3.12 or newer, else into .venv here, made from the first Python 3.12+ found:
# $PYTHON, python3.12, python3.13, python3, then pyenv's. Run the jobs with .venv/bin/python.
# The PyTorch reference (--test): .venv-torch, Python 3.11 with the CPU build of torch 2.13 and
# transformers, run as a separate process by the parity tests; or set MAE_JAX_TORCH_PYTHON to
# any Python that has torch and transformers.
# Versions: constraints.txt pins what CI last tested (setup.py keeps its ranges open), so the
# main job and the tests run on the same stack. --test also makes .venv-jax0.11 (the oldest JAX
# setup.py accepts, for the quick tier: launch/run_tests.sh) and .venv-device (the GPU machine's
# image, launch/device_image.txt) with the wheels it lacks in .whl/ (launch/device_wheels.sh).
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
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
# The tests also lint the launch scripts with shellcheck, and the gs:// tests need openssl and
# nsenter (util-linux).
debs=()
[ -d /usr/share/datasets/fashion-mnist ] || debs+=(dataset-fashion-mnist)
[ "$with_test" -eq 1 ] && ! command -v shellcheck >/dev/null && debs+=(shellcheck)
[ "$with_test" -eq 1 ] && ! command -v openssl >/dev/null && debs+=(openssl)
[ "$with_test" -eq 1 ] && ! command -v nsenter >/dev/null && debs+=(util-linux)
if [ "${#debs[@]}" -gt 0 ] && command -v apt-get >/dev/null; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq || true
  $sudo_cmd apt-get install -y -qq "${debs[@]}" \
    || echo "warning: could not install ${debs[*]}; Fashion-MNIST then comes from TFDS's download" >&2
fi

# python_at MIN_MINOR MAX_MINOR: the first interpreter found of version 3.MIN..3.MAX.
python_at() {
  local cand candidates=()
  [ -n "${PYTHON:-}" ] && [ "$1" -ge 12 ] && candidates+=("$PYTHON")
  for m in $(seq "$1" "$2"); do candidates+=("python3.$m"); done
  candidates+=(python3)
  if command -v pyenv >/dev/null; then
    for m in $(seq "$1" "$2"); do
      candidates+=("$(pyenv root)"/versions/3."$m".*/bin/python3)
    done
  fi
  for cand in "${candidates[@]}"; do
    command -v "$cand" >/dev/null 2>&1 || continue
    if "$cand" -c "import sys; sys.exit(not ((3, $1) <= sys.version_info[:2] <= (3, $2)))" 2>/dev/null; then
      command -v "$cand"; return 0
    fi
  done
  return 1
}

if [ -n "${VIRTUAL_ENV:-}" ] && "$VIRTUAL_ENV/bin/python" -c \
    "import sys; sys.exit(sys.version_info < (3, 12))" 2>/dev/null; then
  venv=$VIRTUAL_ENV
else
  venv=.venv
  if [ ! -x "$venv/bin/python" ]; then
    py=$(python_at 12 99) || {
      echo "error: mae_jax needs Python 3.12 or newer (JAX 0.11 and later dropped 3.11), and none" \
        "was found. Install one (apt-get install python3.12-venv, or uv python install 3.12) or" \
        "name it: PYTHON=/path/to/python3.12 bash launch/setup_env.sh" >&2
      exit 1
    }
    "$py" -m venv "$venv"
  fi
fi
pip_install() { "$venv/bin/python" -m pip install -q --disable-pip-version-check "$@"; }
constraints=$PWD/constraints.txt
extras=()
[ "$with_test" -eq 1 ] && extras+=(test)
# libtpu of the jax version installed (the extra pins jax[tpu] to the same range as jax).
[ "$with_tpu" -eq 1 ] && extras+=(tpu)
if [ "${#extras[@]}" -gt 0 ]; then
  pip_install -c "$constraints" -e ".[$(IFS=,; echo "${extras[*]}")]"
else
  pip_install -c "$constraints" -e .
fi

# new_venv DIR: a venv of Python 3.12+ at DIR (kept if it exists); its pip, quiet.
new_venv() {
  if [ ! -x "$1/bin/python" ]; then
    "$(python_at 12 99)" -m venv "$1"
  fi
}
if [ "$with_test" -eq 1 ]; then
  # The oldest JAX of setup.py's range, with the rest of the lock: the quick tier runs there too.
  new_venv .venv-jax0.11
  grep -v -E '^(jax|jaxlib|libtpu)==' "$constraints" > .venv-jax0.11/constraints.txt
  .venv-jax0.11/bin/python -m pip install -q --disable-pip-version-check \
    -c .venv-jax0.11/constraints.txt "jax==0.11.2" "jaxlib==0.11.2" -e ".[test]"
  # The GPU machine's image (no TensorFlow, no ml-collections), and the wheels it lacks.
  new_venv .venv-device
  .venv-device/bin/python -m pip install -q --disable-pip-version-check -r launch/device_image.txt
  PYTHON="$venv/bin/python" bash launch/device_wheels.sh
fi

if [ "$with_test" -eq 1 ] && [ -z "${MAE_JAX_TORCH_PYTHON:-}" ]; then
  if [ ! -x .venv-torch/bin/python ]; then
    py311=$(python_at 11 11) || {
      echo "error: the parity tests run PyTorch in a reference process on Python 3.11 (the Python" \
        "torch's CPU build 2.13.0 is installed for here), and none was found. Install python3.11," \
        "or set MAE_JAX_TORCH_PYTHON to a Python that has torch and transformers." >&2
      exit 1
    }
    "$py311" -m venv .venv-torch
  fi
  # The CPU build, pinned: a plain `torch` pulls several GB of CUDA wheels.
  .venv-torch/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 \
    "transformers>=4.40" numpy safetensors
fi
echo "mae_jax installed in $venv ($("$venv/bin/python" -c 'import sys, jax; print("Python", sys.version.split()[0], "jax", jax.__version__)'))"
