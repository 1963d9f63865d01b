#!/usr/bin/env bash
# Installs the wheel `make wheel` built (dist/) into a fresh virtual environment whose PATH has no cargo,
# from outside the repository, and runs the README's Quickstart with it: what a user of the wheel gets.
# torch and scikit-learn (for the Quickstart's data) are borrowed from the repository's .venv through a
# path entry placed after the fresh environment's own site-packages, instead of a 1 GB torch download;
# that entry processes no .pth file, so the repository's editable torchgrab stays invisible, and the
# script checks that torchgrab and its Rust extension are the wheel's.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV_PY="$ROOT/.venv/bin/python"
shopt -s nullglob
wheels=("$ROOT"/dist/torchgrab-*-abi3-manylinux*.whl)
sdists=("$ROOT"/dist/torchgrab-*.tar.gz)
[ "${#wheels[@]}" -eq 1 ] || { echo "expected one abi3 manylinux wheel in dist/ (run make wheel), found ${#wheels[@]}" >&2; exit 1; }
[ "${#sdists[@]}" -eq 1 ] || { echo "expected one sdist in dist/ (run make wheel), found ${#sdists[@]}" >&2; exit 1; }

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
tar -tzf "${sdists[0]}" > "$WORK/sdist.txt"
grep -q '^[^/]*/Cargo.toml$' "$WORK/sdist.txt" || { echo "the sdist has no Cargo.toml" >&2; exit 1; }
BASE_PY="$("$VENV_PY" -c 'import sys; print(sys._base_executable)')"
"$BASE_PY" -m venv "$WORK/venv"
FRESH="$WORK/venv/bin/python"
# No cargo, rustc or maturin anywhere on PATH from here on.
export PATH="$WORK/venv/bin:/usr/local/bin:/usr/bin:/bin"
export CARGO_HOME="$WORK/no-cargo" RUSTUP_HOME="$WORK/no-rustup"
if command -v cargo >/dev/null || command -v rustc >/dev/null; then
    echo "cargo or rustc is still on PATH ($PATH)" >&2; exit 1
fi
"$FRESH" -m pip install -q --disable-pip-version-check "${wheels[0]}"

BORROWED="$("$VENV_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
FRESH_SITE="$("$FRESH" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$BORROWED" > "$FRESH_SITE/zz_borrow_torch_from_repo_venv.pth"

"$VENV_PY" - "$ROOT/README.md" > "$WORK/quickstart.py" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
(block,) = re.findall(r"<!-- quickstart: begin -->\n.*?```python\n(.*?)```\n<!-- quickstart: end -->", text, flags=re.S)
print(block)
PY
cd "$WORK"
"$FRESH" - <<PY
import os, sys, torchgrab, torchgrab._native as native
fresh = os.path.realpath("$WORK")
for what, path in [("torchgrab", torchgrab.__file__), ("its Rust extension", native.__file__)]:
    assert os.path.realpath(path).startswith(fresh), f"{what} came from {path}, not from the wheel"
print("torchgrab", torchgrab.__version__, "from", os.path.dirname(torchgrab.__file__))
PY
"$FRESH" quickstart.py | tee quickstart.out
grep -q "epoch 2: last batch loss" quickstart.out
echo "wheel OK: $(basename "${wheels[0]}") installed without cargo and ran the Quickstart"
