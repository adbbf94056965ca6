"""Which modules a Fisher estimate covers, and the hooks that capture their inputs and output-gradients.

A *site* is one ``nn.Linear`` whose input ``x`` [B, T, I] and output-gradient ``g`` [B, T, O] the
estimator needs. Per target layer the sites are:

  kind="diag", target="lora"    the layer's ``lora_A[adapter]`` and ``lora_B[adapter]`` Linears, for
                                every active adapter. peft computes ``lora_B(lora_A(dropout(x))) *
                                scaling``, so the gradient at lora_B's output already carries
                                ``scaling``, and with dropout off (eval mode) lora_A's input is x.
  kind="diag", target="linear"  the layer's base Linear (``base_layer`` inside a peft LoRA layer):
                                the gradient at its output equals the gradient at the whole
                                module's output, since the module adds the LoRA path to it.
  kind="subspace" / "kfac"      the whole module: x is its input, g the gradient at its output
                                (base + LoRA path), i.e. the module's *effective* weight.

Layer names are the module names in the base transformers model, without peft's
``base_model.model.`` prefix, e.g. ``model.layers.0.self_attn.q_proj``.

:class:`Capture` records, during one forward pass, every call of every site (a forward hook keeps
the input and the output tensor; no copies), and makes the input embeddings a leaf that requires
grad so that every site output is in the autograd graph even when all weights are frozen. The
estimator then asks autograd for the gradients of the loss w.r.t. the recorded outputs
(``torch.autograd.grad``), which neither touches ``.grad`` of any parameter nor computes weight
gradients.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
from torch import nn

from ..errors import InputError

PEFT_PREFIX = "base_model.model."


def _lora_layer_types():
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:  # peft absent: no model can be a peft model
        return None, None
    return LoraLayer, LoraLinear


def is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def base_name(name: str) -> str:
    """The module's name in the base transformers model (peft's prefix stripped)."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


@dataclasses.dataclass
class Site:
    """One Linear whose inputs and output-gradients are captured."""

    layer: str  # base-model layer name
    module: nn.Module
    param_name: Optional[str] = None  # for diag: the weight's name in model.named_parameters()
    weight_shape: Optional[tuple] = None


@dataclasses.dataclass
class Layer:
    name: str  # base-model name
    full_name: str  # name in model.named_modules()
    module: nn.Module  # the whole module (a peft LoRA Linear or a plain nn.Linear)
    base: nn.Linear  # the base Linear
    in_features: int
    out_features: int


def _suffix_match(name: str, suffixes: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def _inside_lora(name: str) -> bool:
    """A Linear that is part of a peft LoRA layer (its factors or its wrapped base layer)."""
    parts = name.split(".")
    return parts[-1] == "base_layer" or any(
        p in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B") for p in parts
    )


def _candidates(model: nn.Module):
    """(full name, module, is_lora) for every LoRA layer and every plain Linear outside them."""
    LoraLayer, _ = _lora_layer_types()
    for full, m in model.named_modules():
        if LoraLayer is not None and isinstance(m, LoraLayer):
            yield full, m, True
        elif isinstance(m, nn.Linear) and not _inside_lora(full):
            yield full, m, False


def _linear_summary(model: nn.Module) -> str:
    names = [base_name(full) for full, _, _ in _candidates(model)]
    if not names:
        return "no nn.Linear modules at all"
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
    n_lora = sum(1 for _, _, is_lora in _candidates(model) if is_lora)
    return f"{len(names)} linear modules ({n_lora} with LoRA) named *.{{{', '.join(suffixes)}}}"


def find_layers(
    model: nn.Module, target: str, target_modules: Optional[Sequence[str]]
) -> list[Layer]:
    """The target layers.

    target="lora": the LoRA-wrapped Linears of a peft model (filtered by ``target_modules`` name
    suffixes when given). target="linear": the Linears whose names end in one of
    ``target_modules`` (LoRA-wrapped or not); without ``target_modules``, the LoRA-wrapped ones.
    """
    _, LoraLinear = _lora_layer_types()
    if target_modules is not None:
        if isinstance(target_modules, str) or not all(isinstance(s, str) for s in target_modules):
            raise InputError(f"target_modules must be a list of name suffixes, got {target_modules!r}")
        target_modules = list(target_modules)
    layers: list[Layer] = []
    for full, m, is_lora in _candidates(model):
        name = base_name(full)
        if target_modules is not None and not _suffix_match(name, target_modules):
            continue
        if not is_lora and (target == "lora" or target_modules is None):
            continue
        if is_lora:
            if not isinstance(m, LoraLinear) or not isinstance(m.get_base_layer(), nn.Linear):
                raise InputError(
                    f"layer {name} is a {type(m).__name__} over {type(m.get_base_layer()).__name__}; "
                    "Fisher estimation supports LoRA on nn.Linear only"
                )
            base = m.get_base_layer()
        else:
            base = m
        layers.append(Layer(name, full, m, base, base.in_features, base.out_features))
    if not layers:
        if target_modules is None and target == "lora":
            why = "the model has no LoRA layers (pass a peft model, or target='linear' with target_modules)"
        elif target_modules is None:
            why = "the model has no LoRA layers, so target='linear' needs target_modules (e.g. ['q_proj', 'v_proj'])"
        else:
            kind = "LoRA layer" if target == "lora" else "linear layer"
            why = f"no {kind} matches target_modules={target_modules}"
        raise InputError(f"{why}; found {_linear_summary(model)}")
    return layers


def lora_sites(model: nn.Module, layers: list[Layer]) -> list[Site]:
    """The lora_A / lora_B Linears of every active adapter of every layer, with parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    sites = []
    for L in layers:
        m = L.module
        if getattr(m, "merged", False) or getattr(m, "disable_adapters", False):
            raise InputError(
                f"layer {L.name}: its LoRA adapter is merged or disabled, so the LoRA factors get no "
                "gradient; unmerge / enable the adapter before estimating the Fisher"
            )
        active = [a for a in m.active_adapters if a in m.lora_A]
        if not active:
            raise InputError(f"layer {L.name} has no active LoRA adapter")
        for a in active:
            if a in getattr(m, "lora_variant", {}):
                raise InputError(
                    f"layer {L.name}: adapter {a!r} is a LoRA variant "
                    f"({type(m.lora_variant[a]).__name__}); only vanilla LoRA is supported"
                )
            for part in (m.lora_A[a], m.lora_B[a]):
                if part.bias is not None:
                    raise InputError(f"layer {L.name}: LoRA with a bias (lora_bias) is not supported")
                sites.append(Site(L.name, part, names[id(part.weight)], tuple(part.weight.shape)))
    return sites


def base_sites(model: nn.Module, layers: list[Layer]) -> list[Site]:
    """The base Linear of every layer, with its weight's parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [Site(L.name, L.base, names[id(L.base.weight)], tuple(L.base.weight.shape)) for L in layers]


def module_sites(layers: list[Layer]) -> list[Site]:
    """The whole module of every layer (its effective weight)."""
    return [Site(L.name, L.module) for L in layers]


class Capture:
    """Context manager: hooks on the sites and on the input embeddings.

    After a forward pass, ``calls[i]`` lists ``(x, out)`` for each call of site i, and
    ``outputs()`` gives every recorded output (for ``torch.autograd.grad``).
    """

    def __init__(self, model: nn.Module, sites: list[Site]):
        self.model = model
        self.sites = sites
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in sites]
        self._handles = []

    def __enter__(self):
        emb = self.model.get_input_embeddings()
        if emb is None:
            raise InputError("the model has no input embeddings (get_input_embeddings() is None)")

        def leaf(_m, _args, out):
            # A leaf that requires grad: every later activation is in the graph, weights frozen or not.
            return out.detach().requires_grad_(True)

        self._handles.append(emb.register_forward_hook(leaf))
        for i, s in enumerate(self.sites):
            self._handles.append(s.module.register_forward_hook(self._recorder(i)))
        return self

    def _recorder(self, i):
        def hook(_m, args, out):
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(out, torch.Tensor):
                raise InputError(f"layer {self.sites[i].layer}: expected a tensor input and output")
            self.calls[i].append((x.detach(), out))

        return hook

    def clear(self):
        for c in self.calls:
            c.clear()

    def outputs(self) -> list[torch.Tensor]:
        return [out for c in self.calls for _, out in c]

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()
        return False
