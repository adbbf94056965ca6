"""Fisher estimation on Hugging Face causal LMs with peft LoRA adapters.

``estimate(model, batches, kind="diag" | "subspace" | "kfac", ...)`` returns a :class:`FisherResult`;
the definitions of every stored tensor are in :mod:`sstmerge.fisher.estimator`.
"""

from .estimator import DENSE_MAX_WIDTH, NonFiniteError, estimate
from .result import FisherResult

__all__ = ["DENSE_MAX_WIDTH", "FisherResult", "NonFiniteError", "estimate"]
