"""Test-session set-up shared by every test directory.

``TRITON_INTERPRET=1`` must be set before anything imports triton, so that the triton backend runs
its kernels in the interpreter on CPU tensors and is exercised by the normal (CPU-only) test run.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

@pytest.fixture(scope="session")
def smol(tmp_path_factory):
    """(converted SmolLM2-135M-Instruct checkpoint, its cache dir), converted once per test session."""
    from sstmerge.gguf_convert import ensure_checkpoint

    cache = tmp_path_factory.mktemp("smolcache")
    return ensure_checkpoint(cache, progress=False), cache
