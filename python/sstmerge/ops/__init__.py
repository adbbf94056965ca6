"""The compiled core: each op declared once as a torch custom op, with a pure-torch reference.

Every op takes ``backend="auto"`` (or "torch", "cpp", "cuda", "triton"); see
:mod:`sstmerge.ops.backends`. The references are exported next to the ops so that tests and users
can check any backend against them.
"""

from .backends import BackendStatus, BackendUnavailable, backends
from .diag_fisher_linear import diag_fisher_linear, diag_fisher_linear_reference
from .kfac_factor import kfac_factor, kfac_factor_reference, kfac_sketch, kfac_sketch_reference
from .lora_merge import lora_merge_, lora_merge_reference_
from .subspace_grads import subspace_grads, subspace_grads_reference

__all__ = [
    "BackendStatus",
    "BackendUnavailable",
    "backends",
    "diag_fisher_linear",
    "diag_fisher_linear_reference",
    "kfac_factor",
    "kfac_factor_reference",
    "kfac_sketch",
    "kfac_sketch_reference",
    "lora_merge_",
    "lora_merge_reference_",
    "subspace_grads",
    "subspace_grads_reference",
]
