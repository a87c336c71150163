"""Shared pytest setup: fp32, deterministic, few threads (CI has 2 cores)."""
import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
# raw sources are prepared on first use; keep that out of ~/.cache, shared by the session's subprocesses
os.environ.setdefault("LOOM_DATA_CACHE", tempfile.mkdtemp(prefix="loom-data-cache-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
