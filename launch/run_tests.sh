#!/usr/bin/env bash
# The README's test command, after `bash launch/setup_env.sh --test`: the quick tier on the oldest
# JAX that setup.py accepts (.venv-jax0.11), then the whole suite on the locked one (.venv).
# Arguments go to both pytest runs (e.g. -m "not gcs").
set -euo pipefail
cd "$(dirname "$0")/.."
for venv in .venv-jax0.11 .venv; do
  [ -x "$venv/bin/python" ] || { echo "run_tests.sh: no $venv: run bash launch/setup_env.sh --test" >&2; exit 2; }
done
echo "== quick tier on $(.venv-jax0.11/bin/python -c 'import jax; print("jax", jax.__version__)')"
.venv-jax0.11/bin/python -m pytest -q -m "not slow" -n 2 --dist loadfile tests "$@"
echo "== whole suite on $(.venv/bin/python -c 'import jax; print("jax", jax.__version__)')"
.venv/bin/python -m pytest -q -n 2 --dist loadfile tests "$@"
