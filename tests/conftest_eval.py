"""A tiny, seeded chat model for the eval tests: random LlamaForCausalLM + word-level tokenizer.

The vocabulary is every word of the eval fixtures (tests/fixtures/eval) plus the chat markers, so
prompts tokenise to real ids. Weights are drawn with a large init range (0.3) so that logits are
decisive (greedy argmax far from ties) and the eos token is boosted so some generations stop early.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<user>", "<assistant>", "<eot>"]
CHAT_TEMPLATE = (
    "<s>{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <eot> {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _words() -> list[str]:
    text = []
    for p in sorted(FIXTURES.iterdir()):
        if p.suffix in (".jsonl", ".csv"):
            text.append(p.read_text(encoding="utf-8"))
    text.append("The following are multiple choice questions ( with answers ) about Question Answer : A B C D .")
    words = set(re.findall(r"\w+|[^\w\s]+", "\n".join(text)))
    return sorted(words)


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in _words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    return tok.to_str()


def tiny_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), pad_token="<pad>",
                                unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    t.chat_template = CHAT_TEMPLATE
    return t


@functools.lru_cache(maxsize=None)
def _bpe_json(add_bos: bool) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(_words())] * 3 + _texts(), trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok.to_str()


def _texts() -> list[str]:
    out = []
    for p in sorted(FIXTURES.iterdir()):
        if p.suffix in (".jsonl", ".csv"):
            out.extend(p.read_text(encoding="utf-8").splitlines())
    return out


def bpe_tokenizer(add_bos: bool = True):
    """A byte-level BPE tokenizer (spaces are part of tokens, like Llama/Qwen/GPT-2 tokenizers);
    with ``add_bos`` it prepends <s> by default, like Llama and Mistral tokenizers."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_bpe_json(add_bos)), pad_token="<pad>",
                                unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    t.chat_template = CHAT_TEMPLATE
    return t


def tiny_model(seed: int = 0, eos_boost: float = 2.0, tokenizer=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.3, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] *= eos_boost
    return model, tok


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def one_thread():
    """Tiny models gain nothing from 2 OpenMP threads, and on a loaded 2-core machine spinning threads
    make each tiny GEMM ~10 ms instead of ~20 us. Use as an autouse fixture; restores the setting."""
    import pytest

    @pytest.fixture(autouse=True)
    def _one_thread():
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)

    return _one_thread
