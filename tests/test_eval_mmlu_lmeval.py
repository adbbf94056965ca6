"""MMLU scoring against lm-evaluation-harness itself, item for item (runs where lm_eval imports).

lm-eval is not a dependency of the package, only of its test extra (``pip install ".[test]"``, which
CI runs); tests/test_eval_mmlu.py pins the same behaviour without it.
"""

import pytest

from conftest_eval import FIXTURES, bpe_tokenizer, one_thread, tiny_model
from sstmerge.data.formats import MMLU_CONTINUATIONS, mmlu_prompt
from sstmerge.eval import encode_pair, evaluate_mmlu, load_items

lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface", reason="lm-eval is not installed")
from lm_eval.api.instance import Instance  # noqa: E402

_one_thread = one_thread()


@pytest.mark.parametrize("add_bos", [True, False])
def test_item_for_item_equal_to_lm_eval_hflm(add_bos):
    tok = bpe_tokenizer(add_bos=add_bos)
    model, tok = tiny_model(tokenizer=tok)
    items = load_items("mmlu", FIXTURES / "mmlu_test.jsonl")
    dev = load_items("mmlu", FIXTURES / "mmlu_dev.jsonl")
    lm = lm_eval_hf.HFLM(pretrained=model, tokenizer=tok, batch_size=4, device="cpu")
    for k in (0, 2):
        shots = {}
        if k:
            for d in dev:
                shots.setdefault(d["subject"], [])
                if len(shots[d["subject"]]) < k:
                    shots[d["subject"]].append(d)
        reqs = [Instance(request_type="loglikelihood", doc=it, arguments=(mmlu_prompt(it, shots.get(it["subject"], ())), c), idx=j)
                for it in items for j, c in enumerate(MMLU_CONTINUATIONS)]
        for it in items:  # same context/continuation tokens as lm-eval's own _encode_pair
            ctx = mmlu_prompt(it, shots.get(it["subject"], ()))
            for c in MMLU_CONTINUATIONS:
                assert encode_pair(tok, ctx, c) == tuple(lm._encode_pair(ctx, c))
        theirs = [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]
        ours = evaluate_mmlu(model, tok, items, k_shot=k, dev_items=dev, batch_size=16)
        for n, r in enumerate(ours):
            lp = theirs[4 * n: 4 * n + 4]
            assert r["logprobs"] == pytest.approx(lp, abs=1e-4)
            assert r["pred"] == max(range(4), key=lambda c: (lp[c], -c))  # lm-eval acc: np.argmax
