"""Shared by the app tests (adapters come from conftest.make_adapter)."""

from __future__ import annotations

import torch


def one_thread():
    """Generator for a fixture: tiny models run faster on one thread, and the CI machine is shared (2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
