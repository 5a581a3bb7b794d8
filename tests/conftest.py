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
