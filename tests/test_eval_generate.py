"""sstmerge.eval.generate: greedy, batched, cached, deterministic, batch invariant (fp32)."""

import torch

from conftest_eval import FIXTURES, one_thread, tiny_model
from sstmerge.eval import generate, load_items
from sstmerge.eval.generate import chat_prompt, common_prefix_len, encode_chat, length_sorted_batches

_one_thread = one_thread()


def _prompts():
    items = (load_items("refusal", FIXTURES / "advbench.csv") + load_items("refusal", FIXTURES / "harmbench.csv")
             + load_items("over-refusal", FIXTURES / "xstest.csv"))
    return [it["prompt"] for it in items]


def _naive_greedy(model, tok, prompt, max_new_tokens):
    """Reference: one prompt, no padding, no KV cache, full recompute at every step."""
    ids = tok(chat_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + out]), use_cache=False).logits
            t = int(logits[0, -1].argmax())
            if t == tok.eos_token_id:
                break
            out.append(t)
    return tok.decode(out, skip_special_tokens=True).strip()


def test_matches_uncached_unpadded_reference_and_stops_at_eos():
    model, tok = tiny_model()
    prompts = _prompts()
    got = generate(model, tok, prompts, max_new_tokens=12, batch_size=8)
    want = [_naive_greedy(model, tok, p, 12) for p in prompts]
    assert got == want
    lengths = {len(g.split()) for g in got}
    assert len(lengths) > 2 and 12 in lengths  # some rows stop early (eos), some hit the limit


def test_batch_size_1_vs_16_identical_and_deterministic():
    model, tok = tiny_model()
    prompts = _prompts()
    a = generate(model, tok, prompts, max_new_tokens=16, batch_size=16)
    b = generate(model, tok, prompts, max_new_tokens=16, batch_size=1)
    c = generate(model, tok, prompts, max_new_tokens=16, batch_size=16)
    d = generate(tiny_model()[0], tok, prompts, max_new_tokens=16, batch_size=5)
    assert a == b == c == d
    assert len(set(a)) > len(a) // 2  # outputs differ by prompt: the test can see a mix-up


def test_common_prefix_len_keeps_one_token_per_row():
    assert common_prefix_len([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_len([[1, 2, 3], [1, 2, 3]]) == 2  # equal rows still keep their last token
    assert common_prefix_len([[1, 2], [3, 2]]) == 0
    assert common_prefix_len([[7], [7, 8]]) == 0


def test_shared_prefix_prefill_runs_the_prefix_once_and_matches_the_reference():
    """Prompts opening with one long instruction: the prefill runs it once ([1, P]) and the outputs
    equal the one-prompt, uncached reference."""
    model, tok = tiny_model()
    prompts = ["Answer as briefly as you can and then stop talking now. " + p for p in _prompts()[:10]]
    P = common_prefix_len(encode_chat(tok, prompts))
    assert P > 10
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        got = generate(model, tok, prompts, max_new_tokens=10, batch_size=10)
    finally:
        hook.remove()
    assert shapes[0] == (1, P) and shapes[1][0] == 10
    assert got == [_naive_greedy(model, tok, p, 10) for p in prompts]


def test_order_is_input_order():
    model, tok = tiny_model()
    prompts = _prompts()[:6]
    fwd = generate(model, tok, prompts, max_new_tokens=8, batch_size=4)
    rev = generate(model, tok, prompts[::-1], max_new_tokens=8, batch_size=4)
    assert fwd == rev[::-1]


def test_peft_adapter_changes_outputs_and_runs():
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_model()
    prompts = _prompts()[:8]
    base = generate(model, tok, prompts, max_new_tokens=8, batch_size=8)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   init_lora_weights=False))
    with_adapter = generate(peft_model, tok, prompts, max_new_tokens=8, batch_size=8)
    assert with_adapter == generate(peft_model, tok, prompts, max_new_tokens=8, batch_size=1)
    assert with_adapter != base
    with peft_model.disable_adapter():
        assert generate(peft_model, tok, prompts, max_new_tokens=8, batch_size=8) == base


def test_length_sorted_batches_bounds():
    lengths = [5, 9, 1, 9, 3, 7]
    batches = length_sorted_batches(lengths, 2)
    assert batches == [[1, 3], [5, 0], [4, 2]]
    tb = length_sorted_batches(lengths, 10, max_batch_tokens=20)
    assert all(max(lengths[i] for i in b) * len(b) <= 20 for b in tb)
    assert sorted(i for b in tb for i in b) == list(range(6))


def test_no_chat_template_is_an_error_and_eos_ids_include_generation_config():
    import pytest

    from sstmerge.errors import InputError
    from sstmerge.eval.generate import eos_token_ids

    model, tok = tiny_model()
    model.generation_config.eos_token_id = [tok.eos_token_id, 7]
    assert eos_token_ids(model, tok) == {tok.eos_token_id, 7}
    tok.chat_template = None
    with pytest.raises(InputError, match="no chat_template"):
        generate(model, tok, ["hi"], max_new_tokens=2)
