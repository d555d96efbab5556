"""Fixtures shared by the whole suite: the tiny built-in model, small Cu slabs, one torch thread.

The builders behind them are plain functions in ``tests/builders.py``.
"""

import pytest

from tests import builders


@pytest.fixture(scope="session")
def cu_slabs():
    """Factory ``cu_slabs(n, seed, label=True, amp=0.1)`` of rattled Cu slabs (EMT-labelled)."""
    return builders.cu_slabs


@pytest.fixture
def tiny_model():
    """A one-block built-in MLIP for Cu (16 hidden features, seed 0)."""
    return builders.tiny_builtin((29,), n_hidden=16)


@pytest.fixture
def one_torch_thread():
    """Tiny networks train fastest on one thread (and do not oversubscribe a shared machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
