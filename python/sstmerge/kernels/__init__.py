"""Triton kernels of sstmerge, one file per op (shipped inside the package as ``sstmerge.kernels``).

Importing any of these modules imports triton, so they are imported only when the triton backend
runs an op (see :mod:`sstmerge.ops._triton`); ``import sstmerge`` never imports triton.
Under ``TRITON_INTERPRET=1`` they run in Triton's interpreter on CPU tensors.

Interpreter facts these kernels respect: ``tl.dot`` on bf16 operands is wrong in the interpreter,
so every tile is up-cast to fp32 before ``tl.dot`` (with ``input_precision="ieee"``, so GPU runs do
not silently drop to tf32); a bf16 store does not round like torch in the interpreter, so
bf16 outputs are rounded explicitly (round to nearest even) before they are stored.
"""
