"""The tiny world: a small Llama model, its tokenizer, two real LoRA adapters and their data, built here.

:func:`ensure_tiny_world` builds (first call) or reuses (later calls) a directory holding

* ``base_model/``: a 4-layer, d=128 Llama (about 0.7 M parameters) with a word-level tokenizer and a
  chat template, pretrained on the synthetic world's text (sstmerge.data.world; the assistant complies
  with every request) and then instruction-tuned on answered quizzes of the pretraining subjects (all
  parameters, answer letters only), saved with
  ``save_pretrained`` (safetensors) and loadable by :func:`sstmerge.models.load_model`;
* ``utility_adapter/``, ``safety_adapter/``: peft LoRA adapters (same rank and target modules) trained
  with :func:`sstmerge.train.train_lora`: utility on the world's MMLU-format quiz (answer by letter),
  safety on refusing harmful requests and complying with benign look-alikes;
* ``data/*.jsonl``: the splits, in the real datasets' columns (see sstmerge.data.world).

Everything is seeded; the directory name is a hash of the configuration and the package version, so a
changed recipe builds a new world. The build writes into a temporary directory renamed into place when
complete, and a manifest of file hashes is checked on reuse (a corrupt entry is rebuilt).

Measured on the held-out splits (recipe 2, seed 0; 128 quiz items, 50 harmful, 50 benign prompts;
greedy decoding, GCG refusal keywords; letter log-likelihood): base 33.6 % quiz, 0 % refusal, 0 %
over-refusal; base+utility 75.0 % quiz; base+safety 100 % refusal, 0 % over-refusal; task arithmetic
at alpha=1 (base + dU + dS) 37.5 % quiz and 0 % refusal (the reply slot is taken by the letters);
0.25 dU + dS 46.9 % quiz, 48 % refusal. tests/test_world.py checks the issue's targets on the cache.

``quick=True`` returns the same world. A smaller one was measured (150/100/120/120 steps instead of
250/150/200/200): it saved only about 25 s of CPU (59 s against 86 s) and missed the calibration
(over-refusal 16 %), and a second world would make every fresh test run build twice. The full world
is built once (about 2 minutes on 2 cores) and every caller reuses it.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .data import world as W
from .io import atomic_dir, write_json, write_jsonl

#: Bump when the build recipe changes in a way the config does not capture.
RECIPE = 2

_SPECIALS = ("<pad>", "<unk>", "<s>", "</s>")
#: Word-level pieces: a word or one punctuation mark, each with its leading space, or one whitespace.
TOKEN_PATTERN = r" ?[A-Za-z0-9_]+| ?[^\sA-Za-z0-9_]|\s"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}Question: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Answer: {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class TinyConfig:
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
    safety_steps: int = 200
    safety_lr: float = 5e-3
    adapter_batch: int = 16


@dataclasses.dataclass(frozen=True)
class TinyWorld:
    """Paths of a built tiny world (all inside ``root``). Data files are JSONL; see sstmerge.data.world."""

    root: Path
    base_model: Path
    utility_adapter: Path
    safety_adapter: Path
    mmlu_test: Path
    mmlu_dev: Path
    harmful_test: Path
    benign_test: Path
    safety_train: Path
    utility_train: Path
    safety_fisher: Path
    utility_fisher: Path
    card: Path

    @classmethod
    def at(cls, root: Path) -> "TinyWorld":
        d = root / "data"
        return cls(root=root, base_model=root / "base_model", utility_adapter=root / "utility_adapter",
                   safety_adapter=root / "safety_adapter", mmlu_test=d / "mmlu_test.jsonl",
                   mmlu_dev=d / "mmlu_dev.jsonl", harmful_test=d / "harmful_test.jsonl",
                   benign_test=d / "benign_test.jsonl", safety_train=d / "safety_train.jsonl",
                   utility_train=d / "utility_train.jsonl", safety_fisher=d / "safety_fisher.jsonl",
                   utility_fisher=d / "utility_fisher.jsonl", card=root / "world.json")


def config_key(cfg: TinyConfig) -> str:
    """Hash of the configuration, the recipe number and the package version."""
    blob = json.dumps({"config": dataclasses.asdict(cfg), "recipe": RECIPE, "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """``$SSTMERGE_CACHE`` or ``~/.cache/sstmerge``."""
    return Path(os.environ.get("SSTMERGE_CACHE") or Path.home() / ".cache" / "sstmerge").expanduser()


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
    from .data.formats import mmlu_prompt

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


def _build(cfg: TinyConfig, root: Path, progress: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from .models import load_model
    from .train import finetune_full, pretrain_causal_lm, train_lora

    timings = {}
    t0, c0 = time.perf_counter(), time.process_time()
    world = W.generate_world(cfg.world)
    docs = W.pretraining_corpus(world, cfg.world)
    tokenizer = build_tokenizer(_world_texts(world, docs))
    torch.manual_seed(cfg.seed)
    mcfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                       num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                       max_position_embeddings=cfg.max_positions, tie_word_embeddings=True, rms_norm_eps=1e-6,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(mcfg)
    pre_losses = pretrain_causal_lm(model, tokenizer, docs, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                                    seed=cfg.seed, batch_size=cfg.pretrain_batch, progress=progress)
    timings["pretrain_s"] = round(time.perf_counter() - t0, 2)
    t1 = time.perf_counter()
    sft_losses = finetune_full(model, tokenizer, [W.instruction_rows(world, cfg.world)], steps=cfg.instruct_steps,
                               lr=cfg.instruct_lr, seed=cfg.seed, batch_size=cfg.pretrain_batch, progress=progress)
    timings["instruct_s"] = round(time.perf_counter() - t1, 2)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(root / "base_model", safe_serialization=True)
    tokenizer.save_pretrained(root / "base_model")
    del model
    data = root / "data"
    for name in ("mmlu_test", "mmlu_dev", "harmful_test", "benign_test", "safety_train", "utility_train",
                 "safety_fisher", "utility_fisher", "harmful_train", "benign_train", "harmful_fisher", "benign_fisher"):
        write_jsonl(data / f"{name}.jsonl", world[name])

    base, tok = load_model(root / "base_model", device="cpu")  # the registry path, as users load it
    common = dict(r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.target_modules,
                  batch_size=cfg.adapter_batch, tokenizer=tok, progress=progress)
    t1 = time.perf_counter()
    train_lora(base, world["utility_train"], root / "utility_adapter", steps=cfg.utility_steps,
               lr=cfg.utility_lr, seed=cfg.seed + 1, desc="utility adapter", **common)
    timings["utility_s"] = round(time.perf_counter() - t1, 2)
    t1 = time.perf_counter()
    train_lora(base, world["safety_train"], root / "safety_adapter", steps=cfg.safety_steps,
               lr=cfg.safety_lr, seed=cfg.seed + 2, desc="safety adapter", **common)
    timings["safety_s"] = round(time.perf_counter() - t1, 2)
    timings["total_s"] = round(time.perf_counter() - t0, 2)
    # CPU seconds of this process (the build runs one thread): its wall time on an idle machine
    timings["cpu_s"] = round(time.process_time() - c0, 2)
    return {"timings": timings, "pretrain_loss_last10": sum(pre_losses[-10:]) / 10,
            "instruct_loss_last10": sum(sft_losses[-10:]) / 10,
            "params": sum(p.numel() for p in base.parameters()), "vocab": len(tok),
            "sizes": {k: len(v) for k, v in world.items()}}


def _manifest(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _valid(root: Path) -> bool:
    try:
        recorded = json.loads((root / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return recorded == _manifest(root)


def ensure_tiny_world(cache_dir: str | os.PathLike | None = None, *, quick: bool = False,
                      progress: bool = True, config: TinyConfig | None = None) -> TinyWorld:
    """Return the tiny world, building it first if the cache has no valid copy.

    cache_dir: default :func:`default_cache_dir`. quick: accepted for the layers' ``--quick`` modes and
    returns the same world (see the module docstring). config: an explicit :class:`TinyConfig`.
    Concurrent callers wait on a lock and build once.
    """
    cfg = config or TinyConfig()
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / f"tiny-{config_key(cfg)}"
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if root.exists() and _valid(root):
            return TinyWorld.at(root)
        if root.exists():
            print(f"sstmerge: the cached tiny world {root} is incomplete or corrupt; rebuilding it", file=sys.stderr)
        if progress:
            print(f"sstmerge: building the tiny world in {root} (about 2 minutes on 2 cores)", file=sys.stderr)
        threads = torch.get_num_threads()
        # The matrices are tiny (d=128) and gain little from threads, while oversubscription hurts: on a
        # shared 2-core machine one pretraining step took 0.28 s with one thread and 1-7 s with two.
        torch.set_num_threads(1)
        try:
            with atomic_dir(root) as tmp:
                info = _build(cfg, tmp, progress)
                write_json(tmp / "world.json", {"config": dataclasses.asdict(cfg), "key": config_key(cfg),
                                                "version": __version__, "recipe": RECIPE,
                                                "torch": torch.__version__, **info})
                write_json(tmp / "manifest.json", _manifest(tmp))
        finally:
            torch.set_num_threads(threads)
        return TinyWorld.at(root)
