"""Shared test setup: the repo root on sys.path (the modules are flat files there), and fixtures for the
reference implementations that the parity tests compare against (builders live in tests/_oracles.py)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def meta_group():
    """Meta's fairscale layers need a model-parallel group: a one-process gloo group on CPU, with `.cuda()`
    made a no-op for the duration of the module (its KV caches call it)."""
    pytest.importorskip("fairscale")
    pytest.importorskip("llama_models")
    from _oracles import meta_parallel

    with meta_parallel():
        yield


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run a module's tiny models on one intra-op thread (restored afterwards). At these sizes a second
    thread buys nothing, and on a busy 2-core machine torch's thread pool can turn a 10 us attention call
    into 20 ms while it waits for a descheduled worker."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    # a test that changes the thread count must put it back, or later modules' timings and numerics shift
    assert torch.get_num_threads() == 1, f"a test left {torch.get_num_threads()} intra-op threads set"
    torch.set_num_threads(n)
