# The two commands of the README:
#   make demo   - set everything up (virtualenv, torch, build) and run the main job
#   make test   - set everything up and run the Rust and Python test suites
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.torchgrab-installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml Cargo.toml $(shell find src python -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.1" numpy scikit-learn matplotlib tqdm pytest hypothesis maturin torchdata
	$(PY) -m pip install -q -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits_demo.py

test: $(STAMP)
	cargo test --quiet
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) target out

# Fuzz every cargo-fuzz target for FUZZ_SECONDS each (needs cargo-fuzz; runs on stable via RUSTC_BOOTSTRAP=1).
FUZZ_SECONDS ?= 120
.PHONY: fuzz
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)
