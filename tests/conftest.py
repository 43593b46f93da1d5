"""Test-wide settings: no network, few threads, a fresh plugin registry per test module."""

import os

# Nothing in the tests may reach a hub; fail fast instead of waiting on a network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny test models run faster (and far steadier on a shared machine) on one thread.
torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def _fresh_registry():
    """Tests that swap the process-wide registry cannot leak it into other modules."""
    from n2a_core.plugins import set_registry

    set_registry(None)
    yield
    set_registry(None)
