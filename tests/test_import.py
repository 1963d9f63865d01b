"""What importing torchgrab costs: the samplers without the capture machinery (capture/__init__.py)."""

import subprocess
import sys

import pytest


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize(
    "statement",
    [
        "from torchgrab import GraBSampler, DistributedGraBSampler",
        "import torchgrab.capture; torchgrab.capture.DEFAULT_SKETCH, torchgrab.capture.DEFAULT_BUDGET",
        "import torchgrab.integrations",
    ],
)
def test_import_does_not_load_torch_dynamo(statement):
    # torch.compiler.disable, which the watch() hooks are wrapped in, imports torch._dynamo: about a second,
    # as long as `import torch`. A script that only orders data, and every DataLoader worker started by
    # spawn (it imports the script's modules again), should not pay it.
    out = _run(f"import sys\n{statement}\nprint(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    assert out.strip() == "[]", out


def test_watch_loads_the_capture_code_when_called():
    out = _run(
        "import sys, torch\n"
        "from torchgrab import GraBSampler\n"
        "from torchgrab.capture import DEFAULT_SKETCH, WatchHandle, LayerSketch, register_sketch\n"
        "model = torch.nn.Linear(3, 2)\n"
        "sampler = GraBSampler(n=4, ordering='grab', seed=0)\n"
        "handle = sampler.watch(model)\n"
        "print(type(handle) is WatchHandle, DEFAULT_SKETCH, 'torch._dynamo' in sys.modules)\n"
    )
    assert out.split() == ["True", "32", "True"]


def test_the_stub_file_names_every_name_of_the_extension():
    # python/torchgrab/_native.pyi is what type checkers and editors see of the Rust module; two kernels
    # were missing from it until a test compared the two (__version__ is set by the module, not stubbed).
    import ast
    import os

    from torchgrab import _native

    stub = os.path.join(os.path.dirname(_native.__file__), "_native.pyi")
    with open(stub) as f:
        tree = ast.parse(f.read())
    stubbed = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    public = {name for name in dir(_native) if not name.startswith("_")}
    assert public - stubbed == set(), "names of _native without a stub"
    assert stubbed - public == set(), "stubs of names _native does not have"
