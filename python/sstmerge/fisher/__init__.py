"""Fisher estimation on Hugging Face causal LMs with peft LoRA adapters.

``estimate(model, batches, kind="diag" | "subspace" | "kfac", ...)`` returns a :class:`FisherResult`;
``estimate_many(model, batches, [spec, ...])`` returns several from one forward/backward per batch.
The definitions of every stored tensor are in :mod:`sstmerge.fisher.estimator`.
"""

from .estimator import DENSE_MAX_WIDTH, NonFiniteError, estimate, estimate_many
from .result import FisherResult

__all__ = ["DENSE_MAX_WIDTH", "FisherResult", "NonFiniteError", "estimate", "estimate_many"]
