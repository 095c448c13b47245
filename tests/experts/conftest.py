"""Fixtures of the experts-library tests.

The matrices here are tiny (at most 128×64): on a shared 2-core machine torch's intra-op thread pool only adds
contention (an SVD of six such matrices took seconds instead of milliseconds under load), so these tests run
single-threaded. The setting is restored after each test, so other test folders are unaffected.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
