#!/usr/bin/env bash
# Run the tests on another torch than the project's own .venv has (by default 2.5.1, the oldest that
# sampler.watch() takes), in a virtual environment of its own: .venv-torch-VERSION (-pyX.Y with PYTHON).
#   scripts/test_torch_floor.sh [torch version] [pytest arguments, default: the watch() tests]
#   PYTHON=/path/to/python3.9 scripts/test_torch_floor.sh 2.8.0 tests   # the oldest Python too
# It downloads that torch from PyPI (a CUDA build, about 2.5 GB) and builds torchgrab into the
# environment (needs Rust). CI tests the newest torch only; docs/capturing-gradients.md ("Which torch")
# lists what differs by version.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:-2.5.1}"
shift || true
if [ $# -eq 0 ]; then
  set -- tests/test_watch.py tests/test_flatten.py tests/test_ghost.py
fi
python="${PYTHON:-python3}"
venv=".venv-torch-$version"
[ -z "${PYTHON:-}" ] || venv="$venv-py$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q "torch==$version" pytest hypothesis scikit-learn matplotlib tqdm
"$venv/bin/pip" install -q .
# From a directory outside the checkout, so that the installed torchgrab is the one imported.
here="$PWD"
cd "$(mktemp -d)"
"$here/$venv/bin/python" -c "import torch, torchgrab; print('torch', torch.__version__, 'torchgrab', torchgrab.__file__)"
exec "$here/$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$here" -c "$here/pyproject.toml" \
  "${@/#tests/$here/tests}"
