"""Threads: concurrent steps on one sampler are serialized (never a corrupted state), the GIL is
released while a kernel runs, and the number of rayon threads does not change any result."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from torchgrab import GraBError, GraBSampler


@pytest.mark.parametrize("ordering", ["grab", "pair"])
def test_two_threads_stepping_one_sampler_are_serialized(ordering):
    n, d = 400, 8
    v = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    s = GraBSampler(n=n, ordering=ordering, seed=0)
    it = iter(s)
    order = [next(it) for _ in range(n)]
    errors = []

    def worker(part):
        try:
            for lo in range(0, len(part), 3):
                chunk = part[lo : lo + 3]
                s.step(v[chunk], indices=chunk)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def fifo_worker():
        try:
            for _ in range(50):
                s2.step(np.ones((1, d), np.float32))  # FIFO steps race for the pending queue
        except GraBError as e:
            errors.append(e)

    halves = [order[: n // 2], order[n // 2 :]]
    threads = [threading.Thread(target=worker, args=(h,)) for h in halves]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    # Every unit was balanced exactly once: the state is consistent (a fresh sampler accepts it) and
    # the next order is a permutation.
    state = s.state_dict()
    copy = GraBSampler(n=n, ordering=ordering)
    copy.load_state_dict(state)
    assert sorted(list(copy)) == list(range(n))
    # FIFO steps from two threads: each takes distinct pending indices, none is lost or doubled.
    s2 = GraBSampler(n=n, ordering=ordering, seed=0)
    it2 = iter(s2)
    [next(it2) for _ in range(100)]
    threads = [threading.Thread(target=fifo_worker) for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors and s2._stepped == 100


def _big_step_sampler():
    n, d, rows = 32, 4_000_000, 8
    s = GraBSampler(n=n, ordering="grab", seed=0)
    it = iter(s)
    [next(it) for _ in range(rows)]
    grads = np.random.default_rng(0).normal(size=(rows, d)).astype(np.float32)
    return s, grads


def _other_thread_runs_during(call):
    """True if another Python thread got to run while `call` ran. Python's own thread switching is
    put off (switch interval 1000 s), so it can only run if `call` releases the GIL."""
    go, ran = threading.Event(), threading.Event()

    def other():
        go.wait()
        ran.set()

    t = threading.Thread(target=other)
    old = sys.getswitchinterval()
    t.start()
    sys.setswitchinterval(1000.0)
    try:
        go.set()
        call()
        result = ran.is_set()
    finally:
        sys.setswitchinterval(old)
        t.join()
    return result


def test_the_gil_is_released_during_a_long_step():
    s, grads = _big_step_sampler()
    assert _other_thread_runs_during(lambda: s.step(grads))
    assert s._stepped == 8


def test_the_gil_probe_can_fail():
    """The same probe around pure-Python work that holds the GIL says so: the test above can fail."""
    assert not _other_thread_runs_during(lambda: sum(i * i for i in range(3_000_000)))


SCRIPT = r"""
import json, numpy as np
from torchgrab import GraBSampler
out = {}
import torch
for ordering, dtype_name in [("grab", "float32"), ("grab", "float64"), ("pair", "float32")]:
    if True:
        n, d = 16, 200_000  # wide enough for the kernels to split the work across rayon threads
        v = np.random.default_rng(1).normal(size=(n, d)).astype(dtype_name)
        s = GraBSampler(n=n, ordering=ordering, seed=0, dtype=getattr(torch, dtype_name))
        orders = []
        for _ in range(3):
            order = list(s)
            for lo in range(0, n, 4):
                s.step(v[order[lo:lo + 4]])
            orders.append(order)
        st = s.state_dict()["native"]["balance"]
        out[f"{ordering}-{dtype_name}"] = [orders, st["s"].double().sum().item(), st["s"].double().abs().sum().item()]
print(json.dumps(out))
"""


def test_results_do_not_depend_on_the_number_of_threads():
    runs = []
    for threads in ("1", "2"):
        env = dict(os.environ, RAYON_NUM_THREADS=threads)
        res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        runs.append(json.loads(res.stdout))
    assert runs[0] == runs[1]


FORK_SCRIPT = """
import os, sys, numpy as np
from torchgrab import GraBSampler

def work(ordering, d):
    s = GraBSampler(n=64, ordering=ordering)
    it = iter(s)
    [next(it) for _ in range(64)]
    s.step(np.random.default_rng(0).random((64, d), dtype=np.float32), non_blocking=True)
    s.synchronize()
    return list(s)  # the next epoch's order

def all_work():
    # a background step, and kernels wide enough to run on the thread pool (d >= 2 * 16384)
    return [work("grab", 4096), work("grab", 40000), work("greedy", 40000)]

parent = all_work()
pid = os.fork()
if pid == 0:
    os._exit(0 if all_work() == parent else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_process_forked_after_background_steps_still_steps():
    # rayon's pools do not survive a fork (Lightning's ddp_fork, a notebook's ddp_notebook): a forked
    # child runs its passes and background steps on its own thread, with the same results.
    proc = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
