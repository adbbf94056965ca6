"""Test-session set-up shared by every test directory.

``TRITON_INTERPRET=1`` must be set before anything imports triton, so that the triton backend runs
its kernels in the interpreter on CPU tensors and is exercised by the normal (CPU-only) test run.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
