"""sstmerge.eval.mmlu: lm-evaluation-harness prompt and tokenisation, exact scores, batch invariance."""

import pytest
import torch

from conftest_eval import FIXTURES, one_thread, bpe_tokenizer, tiny_model
from sstmerge.data.formats import MMLU_CONTINUATIONS, mmlu_prompt
from sstmerge.errors import InputError
from sstmerge.eval import encode_pair, evaluate_mmlu, load_items, per_subject, summarize
from sstmerge.eval.mmlu import fewshot_examples, resolve_max_length, tok_encode

ITEM = {"subject": "high_school_mathematics", "question": " What is 7 multiplied by 8? ",
        "choices": ["54", "56", "58", "64"], "answer": 1}
SHOT = {"subject": "high_school_mathematics", "question": "What is 2 plus 2?", "choices": ["3", "4", "5", "6"], "answer": 1}

_one_thread = one_thread()


def test_prompt_string_pinned_zero_and_one_shot():
    # lm_eval/tasks/mmlu/default/_default_template_yaml + mmlu_<subject>.yaml description,
    # fewshot: doc_to_text + target_delimiter " " + letter + fewshot_delimiter "\n\n".
    assert mmlu_prompt(ITEM) == (
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
        "What is 7 multiplied by 8?\nA. 54\nB. 56\nC. 58\nD. 64\nAnswer:")
    assert mmlu_prompt(ITEM, [SHOT]) == (
        "The following are multiple choice questions (with answers) about high school mathematics.\n\n"
        "What is 2 plus 2?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer: B\n\n"
        "What is 7 multiplied by 8?\nA. 54\nB. 56\nC. 58\nD. 64\nAnswer:")
    assert MMLU_CONTINUATIONS == (" A", " B", " C", " D")


def test_encode_pair_like_lm_eval():
    tok = bpe_tokenizer(add_bos=True)
    ctx, cont = encode_pair(tok, "Answer:", " A")
    # the context keeps the tokenizer's BOS (lm-eval 0.4.13: tokenizer default), the continuation is
    # the joint encoding's tail: one byte-level token "ĠA"
    assert ctx[0] == tok.bos_token_id and ctx == tok.encode("Answer:")
    assert tok.convert_ids_to_tokens(cont) == ["ĠA"]
    # a trailing space of the context moves to the continuation
    assert encode_pair(tok, "Answer: ", "A") == (ctx, cont)
    # add_bos_token=False reproduces older lm-eval (add_special_tokens=False for causal LMs)
    ctx0, cont0 = encode_pair(tok, "Answer:", " A", add_bos_token=False)
    assert ctx0 == ctx[1:] and cont0 == cont
    # a string already starting with the BOS text is not given a second BOS
    assert tok_encode(tok, "<s>Answer:") == ctx
    # the continuation is whole[len(ctx):], not encode(continuation): when the joint encoding merges
    # across the boundary they differ, and lm-eval keeps the joint one
    c_ctx, c_cont = encode_pair(tok, "The cell", "s are small")
    whole = tok.encode("The cells are small")
    assert c_ctx + c_cont == whole[: len(c_ctx)] + whole[len(c_ctx):] and c_cont == whole[len(tok.encode("The cell")):]
    with pytest.raises(ValueError):
        encode_pair(tok, "", " A")


def _reference_scores(model, tok, items, shots=None, add_bos_token=None):
    """Independent reference: each (context, choice) scored alone, unpadded, full logits."""
    out = []
    with torch.no_grad():
        for it in items:
            context = mmlu_prompt(it, (shots or {}).get(it["subject"], ()))
            lps = []
            for c in MMLU_CONTINUATIONS:
                ctx, cont = encode_pair(tok, context, c, add_bos_token)
                seq = ctx + cont
                logp = torch.log_softmax(model(input_ids=torch.tensor([seq[:-1]])).logits[0].float(), -1)
                lps.append(float(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(cont))))
            out.append(lps)
    return out


@pytest.mark.parametrize("kind", ["word", "bpe"])
def test_scores_match_unbatched_reference(kind):
    tok = bpe_tokenizer() if kind == "bpe" else None
    model, tok = tiny_model(tokenizer=tok)
    items = load_items("mmlu", FIXTURES / "mmlu_test.jsonl")
    recs = evaluate_mmlu(model, tok, items, batch_size=7)
    ref = _reference_scores(model, tok, items)
    for r, it, lps in zip(recs, items, ref):
        assert r["logprobs"] == pytest.approx(lps, abs=1e-4)
        assert r["pred"] == max(range(4), key=lambda c: (lps[c], -c))
        assert r["gold"] == it["answer"] and r["correct"] == (r["pred"] == r["gold"])
        assert r["id"] == it["id"] and r["subject"] == it["subject"]
    assert len({r["pred"] for r in recs}) > 1  # the random model does not answer one letter everywhere


def test_shared_prefix_runs_once_and_matches_the_reference():
    """Items of one subject open with the same description: a batch runs that prefix once ([1, P])
    and scores as the unbatched, uncached reference does."""
    from sstmerge.eval.generate import common_prefix_len

    model, tok = tiny_model(tokenizer=bpe_tokenizer())
    items = load_items("mmlu", FIXTURES / "mmlu_test.jsonl")
    items = [it for it in items if it["subject"] == items[0]["subject"]]
    assert len(items) > 2
    seqs = [encode_pair(tok, mmlu_prompt(it), " A")[0] for it in items]
    P = common_prefix_len(seqs)
    assert P > 5
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        recs = evaluate_mmlu(model, tok, items, batch_size=len(items))
    finally:
        hook.remove()
    assert shapes[0] == (1, P) and shapes[1][0] == len(items)
    for r, lps in zip(recs, _reference_scores(model, tok, items)):
        assert r["logprobs"] == pytest.approx(lps, abs=1e-4)


def test_batch_size_1_vs_16_and_determinism():
    model, tok = tiny_model(tokenizer=bpe_tokenizer())
    items = load_items("mmlu", FIXTURES / "mmlu_test.jsonl")
    a = evaluate_mmlu(model, tok, items, batch_size=16)
    b = evaluate_mmlu(model, tok, items, batch_size=1)
    c = evaluate_mmlu(model, tok, items, batch_size=16)
    d = evaluate_mmlu(model, tok, items, batch_size=16, max_batch_tokens=200)
    assert a == c  # same model, same batches: identical records, bit for bit
    assert [r["pred"] for r in a] == [r["pred"] for r in b] == [r["pred"] for r in d]
    for x, y in zip(a, b):
        assert x["logprobs"] == pytest.approx(y["logprobs"], abs=1e-5)


def test_k_shot_uses_first_k_dev_items_of_the_subject():
    model, tok = tiny_model()
    items = load_items("mmlu", FIXTURES / "mmlu_test.jsonl")
    dev = load_items("mmlu", FIXTURES / "mmlu_dev.jsonl")
    shots = fewshot_examples(items, dev, 2)
    assert [s["question"] for s in shots["world_religions"]] == [
        "Which religion celebrates Hanukkah?", "What is the sacred river of Hinduism?"]
    recs = evaluate_mmlu(model, tok, items, k_shot=2, dev_items=dev, batch_size=16)
    ref = _reference_scores(model, tok, items, shots)
    for r, lps in zip(recs, ref):
        assert r["logprobs"] == pytest.approx(lps, abs=1e-4)
    zero = evaluate_mmlu(model, tok, items, batch_size=16)
    assert [r["logprobs"] for r in recs] != [r["logprobs"] for r in zero]
    with pytest.raises(InputError, match="dev"):
        evaluate_mmlu(model, tok, items, k_shot=1)
    with pytest.raises(InputError, match="only 3"):
        evaluate_mmlu(model, tok, items, k_shot=4, dev_items=dev)


def test_summary_and_per_subject():
    model, tok = tiny_model()
    items = load_items("mmlu", FIXTURES / "mmlu_test.jsonl")
    recs = evaluate_mmlu(model, tok, items, batch_size=16)
    s = summarize(recs, "correct")
    assert s["n"] == 22 and s["count"] == sum(r["correct"] for r in recs)
    assert s["ci95"][0] <= s["score"] <= s["ci95"][1]
    subj = per_subject(recs)
    assert set(subj) == {"college_biology", "high_school_mathematics", "world_religions"}
    assert sum(v["n"] for v in subj.values()) == 22


def test_max_length_rule_and_left_truncation():
    model, tok = tiny_model()
    assert resolve_max_length(model, tok) == 512
    items = load_items("mmlu", FIXTURES / "mmlu_test.jsonl")[:3]
    short = evaluate_mmlu(model, tok, items, max_length=8)  # inputs cut to their last 8 tokens
    with torch.no_grad():
        for it, r in zip(items, short):
            ctx, cont = encode_pair(tok, mmlu_prompt(it), " A")
            logits = model(input_ids=torch.tensor([(ctx + cont)[-9:-1]])).logits[0, -1].float()
            assert r["logprobs"][0] == pytest.approx(float(torch.log_softmax(logits, -1)[cont[0]]), abs=1e-5)
