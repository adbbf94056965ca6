"""Evaluation: refusal (safety), over-refusal, and MMLU utility; batched, deterministic, shardable.

- :func:`generate`: batched greedy chat completions (left padding, masks, KV cache).
- :func:`is_refusal` / :func:`evaluate_refusal`: keyword refusal detector (GCG/AdvBench prefixes,
  normalised, windowed) or a pluggable judge; records ``{id, prompt, output, refused}``.
- :func:`evaluate_mmlu`: log-likelihood of " A".." D" with lm-evaluation-harness's prompt and
  tokenisation; records ``{id, subject, pred, gold, correct, logprobs}``.
- :func:`summarize` / :func:`per_subject`: score, n, count and a Wilson 95% interval.
- :func:`load_items`: data files in the real datasets' column names (cais/mmlu, AdvBench, HarmBench,
  XSTest).
- ``python -m sstmerge.eval {mmlu,refusal,over-refusal} ...``: the command line.
Under an initialised torch.distributed group items are sharded across ranks (see ``dist``).
See docs/eval.md.
"""

from sstmerge.data.files import load_items
from sstmerge.eval.generate import generate
from sstmerge.eval.mmlu import encode_pair, evaluate_mmlu
from sstmerge.eval.refusal import evaluate_refusal, gcg_is_refusal, is_refusal, load_judge
from sstmerge.eval.summary import per_subject, summarize, wilson_interval

__all__ = [
    "encode_pair", "evaluate_mmlu", "evaluate_refusal", "gcg_is_refusal", "generate", "is_refusal",
    "load_items", "load_judge", "per_subject", "summarize", "wilson_interval",
]
