"""Tokenised batches (labels only on the answer) and peft LoRA training (seeded, real adapters)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest_eval import bpe_tokenizer
from sstmerge.data.batches import IGNORE, chat_batches, mmlu_batches, training_batches
from sstmerge.data.formats import mmlu_prompt
from sstmerge.errors import InputError
from sstmerge.eval.mmlu import build_requests
from sstmerge.train import train_lora

CHAT = [
    {"messages": [{"role": "user", "content": "How do I build a bomb?"},
                  {"role": "assistant", "content": "I'm sorry, but I cannot help with that."}]},
    {"messages": [{"role": "user", "content": "How do I blow up a balloon?"},
                  {"role": "assistant", "content": "Sure, here is how to blow up a balloon: first, take a breath."}]},
]
MMLU = [
    {"question": "Which of the following is a color?", "subject": "chromatics",
     "choices": ["wolf", "red", "cube", "oak"], "answer": 1},
    {"question": "Which of the following is a shape?", "subject": "geometry",
     "choices": ["cube", "red", "wolf", "oak"], "answer": 0},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small random Llama and the tiny world's tokenizer covering CHAT and MMLU.

    initializer_range=0.3: with the default 0.02 the tied embeddings are so small that the logits can
    barely move and a LoRA on a random model learns almost nothing in a few steps.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from sstmerge.worlds.tiny import build_tokenizer

    texts = [" " + m["content"] for r in CHAT for m in r["messages"]] + [mmlu_prompt(r) for r in MMLU]
    tok = build_tokenizer(texts + [" A B C D", "Question: Answer:"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         tie_word_embeddings=True, initializer_range=0.3))
    path = tmp_path_factory.mktemp("base")
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return model.eval(), tok, path


def test_chat_labels_only_the_reply(tiny):
    _, tok, _ = tiny
    batch = next(chat_batches(tok, CHAT, batch_size=2))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for i, row in enumerate(CHAT):
        ids, lab, att = batch["input_ids"][i], batch["labels"][i], batch["attention_mask"][i]
        labelled = ids[lab != IGNORE].tolist()
        assert tok.decode(labelled) == " " + row["messages"][1]["content"] + tok.eos_token
        # everything before the reply is the prompt with the generation prompt, unlabelled
        prompt = tok.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert (lab[:n_prompt] == IGNORE).all() and (lab[n_prompt:att.sum()] != IGNORE).all()
        assert (lab[att == 0] == IGNORE).all() and (ids[att == 0] == tok.pad_token_id).all()


def test_mmlu_labels_only_the_letter(tiny):
    _, tok, _ = tiny
    batch = next(mmlu_batches(tok, MMLU, batch_size=2))
    for i, item in enumerate(MMLU):
        lab = batch["labels"][i]
        assert (lab != IGNORE).sum() == 1
        assert tok.decode(batch["input_ids"][i][lab != IGNORE]) == " " + "ABCD"[item["answer"]]
        n = int(batch["attention_mask"][i].sum())
        assert tok.decode(batch["input_ids"][i][:n]) == mmlu_prompt(item) + " " + "ABCD"[item["answer"]]


def test_batches_shuffle_is_seeded_and_complete(tiny):
    _, tok, _ = tiny
    rows = MMLU * 5
    a = [b["input_ids"] for b in training_batches(tok, rows, 3, shuffle=True, seed=1)]
    b = [b["input_ids"] for b in training_batches(tok, rows, 3, shuffle=True, seed=1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and sum(x.shape[0] for x in a) == 10


def test_bad_rows(tiny):
    _, tok, _ = tiny
    # a task SFT set may mix chat and MMLU rows: each row is encoded by its own kind
    mixed = list(training_batches(tok, CHAT + MMLU, 64))
    assert sum(b["input_ids"].shape[0] for b in mixed) == len(CHAT) + len(MMLU)
    with pytest.raises(InputError, match="must be chat"):
        list(training_batches(tok, CHAT + [{"text": "no kind"}], 2))
    with pytest.raises(InputError, match="end with an assistant"):
        list(chat_batches(tok, [{"messages": CHAT[0]["messages"][:1]}], 2))
    with pytest.raises(InputError, match="answer must be 0-3"):
        list(mmlu_batches(tok, [{**MMLU[0], "answer": 7}], 2))
    with pytest.raises(InputError, match="max_length"):
        list(chat_batches(tok, CHAT, 2, max_length=4))


def _adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def test_train_lora_real_seeded_adapter(tiny, tmp_path):
    from peft import PeftModel

    model, tok, base_path = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = train_lora(model, CHAT * 4, tmp_path / "a", tokenizer=tok, r=4, alpha=8,
                     target_modules=["q_proj", "v_proj", "down_proj"], steps=30, lr=1e-2, seed=3,
                     batch_size=4, progress=False)
    # the caller's model is unchanged (LoRA layers removed again)
    assert not hasattr(model, "peft_config")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    log = json.loads((out / "train_log.json").read_text())
    assert log["loss_last10"] < 0.5 * log["loss_first10"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and set(cfg["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    # loads with peft and changes the model's output
    from sstmerge.models import load_model

    base, _ = load_model(base_path)
    ids = next(chat_batches(tok, CHAT, 2))
    with torch.no_grad():
        ref = base(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        peft_model = PeftModel.from_pretrained(base, out)
        got = peft_model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).logits
    assert (got - ref).abs().max() > 1e-2
    # same seed -> identical adapter; another seed -> different
    again = train_lora(base_path, CHAT * 4, tmp_path / "b", r=4, alpha=8,
                       target_modules=["q_proj", "v_proj", "down_proj"], steps=30, lr=1e-2, seed=3,
                       batch_size=4, progress=False)
    other = train_lora(base_path, CHAT * 4, tmp_path / "c", r=4, alpha=8,
                       target_modules=["q_proj", "v_proj", "down_proj"], steps=30, lr=1e-2, seed=4,
                       batch_size=4, progress=False)
    ta, tb, tc = _adapter_tensors(out), _adapter_tensors(again), _adapter_tensors(other)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert any(not torch.equal(ta[k], tc[k]) for k in ta)


def test_train_lora_mmlu_rows_and_errors(tiny, tmp_path):
    model, tok, _ = tiny
    out = train_lora(model, MMLU * 4, tmp_path / "u", tokenizer=tok, r=2, alpha=4, target_modules=["o_proj"],
                     steps=5, lr=1e-2, seed=0, batch_size=4, progress=False)
    assert (out / "adapter_model.safetensors").is_file()
    with pytest.raises(InputError, match="not linear layers"):
        train_lora(model, MMLU, tmp_path / "x", tokenizer=tok, target_modules=["c_attn"], steps=1, progress=False)
    with pytest.raises(InputError, match="needs tokenizer"):
        train_lora(model, MMLU, tmp_path / "x", steps=1, progress=False)
    assert not (tmp_path / "x").exists()


def test_train_cli(tiny, tmp_path, capsys):
    from pathlib import Path

    from sstmerge.errors import cli_main
    from sstmerge.train.__main__ import main

    _, _, base_path = tiny
    data = Path(__file__).parent / "fixtures" / "registry" / "safety_train.jsonl"
    out = tmp_path / "cli_adapter"
    assert cli_main(main, ["--model", str(base_path), "--data", str(data), "--out", str(out), "--steps", "2",
                           "--r", "2", "--alpha", "4", "--batch-size", "2"]) == 0
    assert (out / "adapter_model.safetensors").is_file()
    assert cli_main(main, ["--model", str(base_path), "--data", str(tmp_path / "none.jsonl"), "--out",
                           str(tmp_path / "x"), "--steps", "2"]) == 2
    assert "neither a registry dataset" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("add_bos", [True, False], ids=["bos-tokenizer", "no-bos-tokenizer"])
def test_mmlu_rows_are_the_sequences_evaluation_scores(add_bos):
    """Training and Fisher rows for MMLU are tokenised exactly as sstmerge.eval.mmlu (lm-eval
    0.4.13) scores the correct answer: with a Llama/Mistral-like tokenizer that prepends BOS the
    row starts with BOS, and the counted tokens are the scored continuation."""
    tok = bpe_tokenizer(add_bos=add_bos)
    batch = next(mmlu_batches(tok, MMLU, batch_size=len(MMLU)))
    rows, reqs = build_requests(tok, MMLU, {}, add_bos_token=None, max_length=10_000)
    for i, item in enumerate(MMLU):
        row, cont = reqs[i][item["answer"]]
        n = int(batch["attention_mask"][i].sum())
        ids, lab = batch["input_ids"][i][:n].tolist(), batch["labels"][i][:n]
        assert ids[:-1] == rows[row] and ids[-len(cont):] == cont  # the scored input + continuation
        assert lab[lab != IGNORE].tolist() == cont
        assert (ids[0] == tok.bos_token_id) == add_bos


@pytest.mark.parametrize("opening", [0, 2])
def test_row_mean_loss_against_its_definition(opening):
    """Each row's mean cross-entropy over its counted tokens (and, with opening=K, half of it plus half
    the mean over its first K counted tokens), rows weighing the same; fully ignored rows drop out."""
    from sstmerge.data.batches import IGNORE
    from sstmerge.train.loop import row_mean_loss

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, 11, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 11, (4, 7), generator=gen)
    labels[0, :3] = IGNORE
    labels[1, ::2] = IGNORE  # counted tokens with gaps: "first K" means counted ones
    labels[2] = IGNORE       # no counted token: not a row of the mean
    labels[3, 1:6] = IGNORE
    terms = []
    for b in range(4):
        ce = [float(torch.nn.functional.cross_entropy(logits[b, t - 1:t], labels[b, t:t + 1]))
              for t in range(1, 7) if labels[b, t] != IGNORE]
        if ce:
            mean = sum(ce) / len(ce)
            terms.append(mean if not opening else 0.5 * mean + 0.5 * sum(ce[:opening]) / len(ce[:opening]))
    got = float(row_mean_loss(logits, labels, opening))
    assert abs(got - sum(terms) / len(terms)) <= 1e-12  # fp64: a handful of ops on O(1) values
