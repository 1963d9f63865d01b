"""The defaults of ``watch()``, apart from the code that uses them: :mod:`torchgrab.sampler` needs them for
its signature, and importing them must not import the capture machinery (see ``capture/__init__.py``)."""

DEFAULT_SKETCH = 32  # per-factor sketch size k; see docs (Capturing gradients) for how it was chosen
DEFAULT_BUDGET = 0.25  # a layer's sketch may cost this fraction of its forward; see docs for why
