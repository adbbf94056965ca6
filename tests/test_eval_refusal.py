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
