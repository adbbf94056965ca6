"""The tiny world: a small Llama model, its tokenizer, two real LoRA adapters and their data, built here.

:func:`ensure` builds (first call) or reuses (later calls) a directory holding

* ``base_model/``: a 4-layer, d=128 Llama (about 0.7 M parameters) with a word-level tokenizer and a
  chat template (``User: ...\nAssistant: ...``), pretrained on the synthetic world's text
  (:mod:`sstmerge.data.world`; the assistant complies with every request) and then instruction-tuned
  on answered quizzes of the pretraining subjects (all parameters, answer letters only), saved with
  ``save_pretrained`` (safetensors) and loadable by :func:`sstmerge.models.load_model`;
* ``utility_adapter/``, ``safety_adapter/``: peft LoRA adapters (same rank and target modules) trained
  with :func:`sstmerge.train.train_lora`: utility on the world's MMLU-format quiz plus technical help
  in chat, safety on refusing harmful requests and complying with benign look-alikes;
* ``data/<split>.jsonl``: every split of :data:`sstmerge.worlds.base.SPLITS`, in the real datasets'
  columns; dev and test use disjoint templates (see :mod:`sstmerge.data.world`).

Everything is seeded; the directory name is a hash of the configuration, the recipe number and the
package version, so a changed recipe builds a new world. The build writes into a temporary directory
renamed into place when complete, and a manifest of file hashes is checked on reuse (a corrupt entry
is rebuilt). The build runs in a child process with pinned numerics (:mod:`sstmerge.worlds.pinned`), so
every x86-64 CPU builds the same world. ``python -m sstmerge.worlds reference tiny`` measures the reference table; docs/merge.md
gives it under several CPU settings and seeds.

``quick=True`` returns the same world: a second, smaller world would make every fresh test run build
twice, and the full one builds in about two minutes on 2 cores.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path

import torch

from .. import __version__
from ..data import world as W
from ..io import cache_root, write_jsonl
from . import aligned, pinned
from .base import SPLITS, World, base_letters, cached_build, config_key, valid

NAME = "tiny"
#: Bump when the build recipe changes in a way the config does not capture.
RECIPE = 5  # 5: built under pinned numerics (recipe 4's data and training)
#: exp1's evaluation settings for this world (a reply opens with its decision: 16 tokens show it).
EVAL_DEFAULTS = {"max_new_tokens": 16, "batch_size": 32}

_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
#: Word-level pieces: a word or one punctuation mark, each with its leading space, or one whitespace.
TOKEN_PATTERN = r" ?[A-Za-z0-9_]+| ?[^\sA-Za-z0-9_]|\s"
#: The reply goes after "Assistant:", not after "Answer:" where the MMLU prompt expects its letter.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything that determines the tiny world (its hash names the cache entry)."""

    world: W.WorldConfig = W.WorldConfig()
    seed: int = 0
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    intermediate: int = 256
    max_positions: int = 256
    pretrain_steps: int = 250
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 32
    instruct_steps: int = 150
    instruct_lr: float = 2e-3
    lora_r: int = 8
    lora_alpha: float = 16
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    utility_steps: int = 200
    utility_lr: float = 3e-3
    safety_steps: int = 300
    safety_lr: float = 5e-3
    adapter_batch: int = 16
    #: Training dtype (the saved model is fp32). fp64 alone does not make the world CPU-independent: fp64
    #: builds on one Zen 4 with ATEN_CPU_CAPABILITY avx512 vs avx2 differed by 42 points of task-arithmetic
    #: refusal (training amplifies any round-off); the pinned build (worlds.pinned) does, in fp32, at half
    #: fp64's cost.
    train_dtype: str = "float32"
    #: Every training row weighs the same (see sstmerge.train.loop): a quiz's one answer letter is not
    #: outweighed by the 20-token replies of the chats it is mixed with.
    loss_weighting: str = "row"


def build_tokenizer(texts):
    """A word-level ``PreTrainedTokenizerFast`` over the pieces of ``texts``, with the chat template.

    Pieces follow :data:`TOKEN_PATTERN`, so encode(context) + encode(" A") == encode(context + " A"), and
    decoding concatenates pieces exactly (no spaces invented), so refusal keywords survive decoding.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = set()
    for t in texts:
        pieces.update(re.findall(TOKEN_PATTERN, t))
    vocab = {s: i for i, s in enumerate(_SPECIALS)}
    for p in sorted(pieces):
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(TOKEN_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _world_texts(world: dict, docs: list) -> list[str]:
    """Every string the tokenizer must cover (all splits, the corpus, the templates' fixed words)."""
    texts = [CHAT_TEMPLATE.replace("{", " ").replace("}", " "), W.REFUSAL, "Question: Answer:"]
    texts += [" " + x for x in ("A", "B", "C", "D")]
    from ..data.formats import mmlu_prompt

    for name, rows in world.items():
        for r in rows:
            if "messages" in r:
                texts += [" " + m["content"] for m in r["messages"]]  # as the template renders it
            elif "question" in r:
                texts.append(mmlu_prompt(r))
            else:
                texts.append(" " + r["prompt"])
                texts += [r.get("target", "")]
    for d in docs:
        texts += [d["text"]] if "text" in d else [" " + m["content"] for m in d["messages"]]
    return texts


def _build(cfg: Config, root: Path, progress: bool) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    world = W.generate_world(cfg.world)
    info = build_base(cfg, world, root / "base_model", progress)
    info["retain_agreement"] = label_retain_with_base(world, root / "base_model")
    data = root / "data"
    for name in (*SPLITS, "harmful_train", "benign_train", "harmful_fisher", "benign_fisher"):
        write_jsonl(data / f"{name}.jsonl", world[name])
    info["timings"].update(build_adapters(cfg, world, root / "base_model", root, progress))
    info["timings"]["total_s"] = round(time.perf_counter() - t0, 2)
    # CPU seconds of this process (the build runs one thread): its wall time on an idle machine
    info["timings"]["cpu_s"] = round(time.process_time() - c0, 2)
    info["sizes"] = {k: len(v) for k, v in world.items()}
    return info


def build_base(cfg: Config, world: dict, out: Path, progress: bool) -> dict:
    """Pretrain and instruction-tune the base model on ``world``'s text; save it (and its tokenizer) to
    ``out``. Returns timings, final losses, parameter count and vocabulary size."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ..train import finetune_full, pretrain_causal_lm

    timings = {}
    t0 = time.perf_counter()
    docs = W.pretraining_corpus(world, cfg.world)
    tokenizer = build_tokenizer(_world_texts(world, docs))
    torch.manual_seed(cfg.seed)
    mcfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=cfg.max_positions, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(mcfg).to(getattr(torch, cfg.train_dtype))
    pre_losses = pretrain_causal_lm(model, tokenizer, docs, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                                    seed=cfg.seed, batch_size=cfg.pretrain_batch, progress=progress)
    timings["pretrain_s"] = round(time.perf_counter() - t0, 2)
    t1 = time.perf_counter()
    sft_losses = finetune_full(model, tokenizer, [W.instruction_rows(world, cfg.world)], steps=cfg.instruct_steps,
                               lr=cfg.instruct_lr, seed=cfg.seed, batch_size=cfg.pretrain_batch, progress=progress,
                               loss_weighting=cfg.loss_weighting)
    timings["instruct_s"] = round(time.perf_counter() - t1, 2)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(torch.float32)  # the saved model is fp32, as the registry loads it
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return {"timings": timings, "pretrain_loss_last10": sum(pre_losses[-10:]) / 10,
            "instruct_loss_last10": sum(sft_losses[-10:]) / 10,
            "params": sum(p.numel() for p in model.parameters()), "vocab": len(tokenizer)}


def label_retain_with_base(world: dict, base_dir: Path) -> float:
    """Give ``safety_train``'s retain quizzes (``"retain": True``) the base model's own answer letter, in
    place (:func:`sstmerge.worlds.base.base_letters`). Returns the share already right."""
    rows = [r for r in world["safety_train"] if r.get("retain")]
    relabelled, agree = base_letters(base_dir, rows)
    for r, q in zip(rows, relabelled):
        r["answer"] = q["answer"]
    return agree


def build_adapters(cfg: Config, world: dict, base_dir: Path, root: Path, progress: bool) -> dict:
    """Train the utility and the safety LoRA adapter on the base model in ``base_dir``; save them to
    ``root/utility_adapter`` and ``root/safety_adapter``. Returns their timings."""
    from ..models import load_model
    from ..train import train_lora

    timings = {}
    base, tok = load_model(base_dir, device="cpu")  # the registry path, as users load it
    base.to(getattr(torch, cfg.train_dtype))
    common = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                  batch_size=cfg.adapter_batch, tokenizer=tok, progress=progress,
                  loss_weighting=cfg.loss_weighting, save_dtype=torch.float32)
    t1 = time.perf_counter()
    train_lora(base, world["utility_train"], root / "utility_adapter", steps=cfg.utility_steps,
               lr=cfg.utility_lr, seed=cfg.seed + 1, desc="utility adapter", **common)
    timings["utility_s"] = round(time.perf_counter() - t1, 2)
    t1 = time.perf_counter()
    train_lora(base, world["safety_train"], root / "safety_adapter", steps=cfg.safety_steps,
               lr=cfg.safety_lr, seed=cfg.seed + 2, desc="safety adapter", **common)
    timings["safety_s"] = round(time.perf_counter() - t1, 2)
    return timings


def _dirname(cfg: Config) -> str:
    return f"tiny-{config_key(cfg, RECIPE, __version__)}"


def ensure(cache_dir: str | os.PathLike | None = None, *, progress: bool = True, config: Config | None = None,
           quick: bool = False) -> World:
    """The tiny world, built first if the cache has no valid copy.

    cache_dir: default :func:`sstmerge.worlds.base.default_cache_dir`. config: an explicit :class:`Config`.
    quick: accepted for the layers' ``--quick`` modes; returns the same world (module docstring).
    Concurrent callers wait on a lock and build once.
    """
    cfg = config or Config()

    def build(tmp: Path) -> dict:
        threads = torch.get_num_threads()
        # The matrices are tiny (d=128) and gain little from threads, while oversubscription hurts: on a
        # shared 2-core machine one pretraining step took 0.28 s with one thread and 1-7 s with two.
        torch.set_num_threads(1)
        try:
            info = _build(cfg, tmp, progress)
        finally:
            torch.set_num_threads(threads)
        return {"config": dataclasses.asdict(cfg), "key": config_key(cfg, RECIPE, __version__),
                "version": __version__, "recipe": RECIPE, "torch": torch.__version__,
                "numerics": pinned.numerics(), **info}

    cache = cache_root(cache_dir)
    if not pinned.is_pinned() and not valid(cache / _dirname(cfg)):
        pinned.build(NAME, cache, cfg, progress=progress)  # the same bits on every CPU (worlds.pinned)
    root = cached_build(cache, _dirname(cfg), build, progress=progress, what="tiny world",
                        expect="about 2 minutes on 2 cores")
    return World.at(NAME, root)


def aligned_pair(cache_dir: str | os.PathLike | None = None, *, progress: bool = True,
                 config: Config | None = None) -> tuple[Path, Path]:
    """``(aligned twin, base model)``: the pair Safe LoRA and SafeMERGE read (:mod:`sstmerge.worlds.aligned`).
    The twin is a LoRA of the safety adapter's shape and budget with its own seed, trained on the same
    safety rows under pinned numerics (as the world), fused into the base; built on first use (seconds)."""
    from ..models import load_model
    from ..train import train_lora

    cfg = config or Config()
    cache = cache_root(cache_dir)
    world = ensure(cache, progress=progress, config=cfg)
    settings = {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "target_modules": cfg.target_modules,
                "batch_size": cfg.adapter_batch, "steps": cfg.safety_steps, "lr": cfg.safety_lr,
                "seed": cfg.seed + aligned.SEED_OFFSET, "loss_weighting": cfg.loss_weighting, "dtype": cfg.train_dtype}
    if not pinned.is_pinned() and not valid(cache / aligned.dirname(world, settings)):
        pinned.build(NAME, cache, cfg, progress=progress, entry="aligned_pair")

    def train(out: Path, rows: list[dict]) -> None:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the world's build (see ensure)
        try:
            base, tok = load_model(world.base_model, device="cpu")
            base.to(getattr(torch, cfg.train_dtype))
            train_lora(base, rows, out, r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                       batch_size=cfg.adapter_batch, tokenizer=tok, progress=progress, loss_weighting=cfg.loss_weighting,
                       save_dtype=torch.float32, steps=cfg.safety_steps, lr=cfg.safety_lr, seed=settings["seed"],
                       desc="aligned twin")
        finally:
            torch.set_num_threads(threads)

    return aligned.ensure(world, settings, train, cache, progress=progress, expect="seconds"), world.base_model


def base_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The tiny world's base model (the world is built first if needed: the base is trained here)."""
    return ensure(cache_dir).base_model
