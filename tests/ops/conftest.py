"""The `backend` fixture of every op test: each non-reference backend, skipped (with why) when unusable."""

import pytest

from opsutil import NON_REFERENCE, backend_param


@pytest.fixture(params=NON_REFERENCE)
def backend(request):
    return backend_param(request)
