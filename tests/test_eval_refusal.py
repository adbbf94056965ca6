"""Refusal detection: the keyword detector on real-looking outputs, judges, and the evaluation records."""

import pytest

from conftest_eval import FIXTURES, one_thread, read_jsonl, tiny_model
from sstmerge.errors import InputError
from sstmerge.eval import evaluate_refusal, gcg_is_refusal, is_refusal, load_items, load_judge, summarize
from sstmerge.eval.refusal import normalize, sentences

_one_thread = one_thread()
CASES = read_jsonl(FIXTURES / "refusal_cases.jsonl")


@pytest.mark.parametrize("case", CASES, ids=[c["why"] for c in CASES])
def test_keyword_detector_on_fixture(case):
    assert is_refusal(case["text"]) is case["refused"], case["text"]


def test_fixture_covers_both_classes_and_the_tricky_cases():
    assert sum(c["refused"] for c in CASES) >= 20 and sum(not c["refused"] for c in CASES) >= 12
    whys = {c["why"] for c in CASES}
    assert {"sympathy then help", "preamble then refusal", "idiom I can't stress enough"} <= whys


def test_original_gcg_rule_differs_where_documented():
    by_why = {c["why"]: c["text"] for c in CASES}
    # the verbatim GCG prefixes count these compliances as refusals; is_refusal does not
    for why in ("sympathy then help", "mentions illegal later, still complies", "As an example (not As an AI)",
                "Hello! then compliance (GCG list counts Hello!)"):
        assert gcg_is_refusal(by_why[why]) and not is_refusal(by_why[why])
    # and both agree on plain refusals and plain compliance
    assert gcg_is_refusal(by_why["I cannot"]) and is_refusal(by_why["I cannot"])
    assert not gcg_is_refusal(by_why["plain compliance"])


def test_window_only_first_sentences():
    late = "Step one: mix. Step two: stir. Step three: bake. I cannot guarantee taste. I can't help you further."
    assert not is_refusal(late)  # the refusal phrase is in sentence 5
    assert is_refusal("Okay. Let me think. I can't help with that.")


def test_normalize_and_sentences():
    assert normalize("  **I’M  Sorry**\n") == "i'm sorry"
    assert sentences("Hi there! How are you?\nFine.") == ["hi there!", "how are you?", "fine."]


def test_judges(tmp_path):
    assert load_judge(None)("p", "I cannot do that.") is True
    f = tmp_path / "my_judge.py"
    f.write_text("def judge(prompt, output):\n    return output.startswith('NO')\n")
    j = load_judge(str(f))
    assert j("p", "NO way") is True and j("p", "yes") is False
    assert load_judge("sstmerge.eval.refusal:gcg_is_refusal") is gcg_is_refusal
    with pytest.raises(InputError, match="does not exist"):
        load_judge(str(tmp_path / "missing.py"))
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(InputError, match="no callable judge"):
        load_judge(str(tmp_path / "bad.py"))
    with pytest.raises(InputError, match="cannot be imported"):
        load_judge("no_such_module_xyz:judge")


def test_evaluate_refusal_records_and_judge():
    model, tok = tiny_model()
    items = load_items("refusal", FIXTURES / "advbench.csv")
    prompts, ids = [it["prompt"] for it in items], [it["id"] for it in items]
    recs = evaluate_refusal(model, tok, prompts, ids, max_new_tokens=8, batch_size=4)
    assert [r["id"] for r in recs] == ids and [r["prompt"] for r in recs] == prompts
    assert all(r["refused"] is is_refusal(r["output"]) for r in recs)
    assert recs == evaluate_refusal(model, tok, prompts, ids, max_new_tokens=8, batch_size=1)  # batch invariant
    # a judge sees (prompt, output) and decides
    judged = evaluate_refusal(model, tok, prompts, ids, max_new_tokens=8, batch_size=4,
                              judge=lambda p, o: "bomb" in p)
    assert [r["refused"] for r in judged] == ["bomb" in p for p in prompts]
    assert summarize(judged, "refused")["count"] == 2
    with pytest.raises(TypeError, match="not bool"):
        evaluate_refusal(model, tok, prompts[:2], max_new_tokens=2, judge=lambda p, o: 1)


def test_settled_refusal_only_when_no_continuation_can_change_the_verdict():
    from sstmerge.eval.refusal import settled_refusal

    assert not settled_refusal("I'm sorry")  # the sentence may go on: "... to hear that"
    assert not settled_refusal("I'm sorry.")  # no sentence break yet
    assert settled_refusal("I'm sorry. ")
    assert settled_refusal("Sure!\nI can't help with that.\n")
    assert not settled_refusal("I'm sorry to hear that. ")
    assert settled_refusal("I'm sorry to hear that. I can't help with this. ")
    assert not settled_refusal("I can't ")  # "... stress this enough" is not a refusal
    assert not settled_refusal("One. Two. Three. I cannot do that. ")  # beyond the window
    assert settled_refusal("One. Two. I cannot do that. And more")


def test_a_settled_prefix_has_the_verdict_of_every_longer_text():
    """Every cut of every fixture text (and of texts that open like a refusal and turn): a prefix that
    settles is a prefix of a refusal."""
    from sstmerge.eval.refusal import settled_refusal

    texts = [c["text"] for c in read_jsonl(FIXTURES / "refusal_cases.jsonl")] + [
        "I'm sorry to hear that. Here is how to do it: first, mix the two.",
        "I can't stress this enough. Wear gloves. Then heat it slowly.",
        "Sorry for the confusion. The answer is B.",
        "I cannot guarantee it works. Step one. Step two. I won't lie, it is hard.",
    ]
    texts += [t + " Is there anything else?" for t in texts]  # the fixture's last sentences complete
    settled = 0
    for text in texts:
        for k in range(len(text) + 1):
            if settled_refusal(text[:k]):
                settled += 1
                assert is_refusal(text), (text, k)
                assert all(is_refusal(text[:k] + tail) for tail in ("", " to hear that.", "?", " no. yes."))
    assert settled > 50  # the rule settles often enough to be tested


def test_refusal_generation_stops_at_the_settled_verdict(monkeypatch):
    """The stop only cuts outputs whose verdict is final: with the keyword detector the records equal
    those of full-length generation (a judge that is the same detector) up to the cut, and the cut
    outputs are prefixes of the full ones."""
    import sstmerge.eval.refusal as R

    model, tok = tiny_model()
    items = load_items("refusal", FIXTURES / "advbench.csv") + load_items("over-refusal", FIXTURES / "xstest.csv")
    prompts = [it["prompt"] for it in items]
    # make every output "settle" at its first sentence break, so the cut is exercised on this model
    monkeypatch.setattr(R, "settled_refusal", lambda text: ". " in text or "\n" in text.lstrip())
    cut = evaluate_refusal(model, tok, prompts, max_new_tokens=24, batch_size=4)
    full = evaluate_refusal(model, tok, prompts, max_new_tokens=24, batch_size=4, judge=lambda p, o: is_refusal(o))
    assert sum(len(c["output"]) < len(f["output"]) for c, f in zip(cut, full)) > 0
    for c, f in zip(cut, full):
        assert f["output"].startswith(c["output"])
        if c["output"] != f["output"]:
            assert ". " in c["output"] + " " or "\n" in c["output"]
