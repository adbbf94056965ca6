"""sstmerge: Fisher-guided merging of LoRA adapters and an honest Safety Tax experiment.

Layers, data flowing one way: data -> models (+adapters) -> fisher -> merge -> eval -> stats -> report.
The compiled kernels live in ``sstmerge.ops``.
"""

__version__ = "0.1.0"
