"""`python -m sstmerge.exp1 --model M --plan`: each stage's peak GPU memory, host memory, disk and
time, from the model's shapes (config.json or the registry's SHAPES; no weights loaded). The
arithmetic is the one written out in docs/models.md, section "Planning a run"; the names below
follow it. CPU merge times are measured here: each method's sweep on a synthetic layer of every
distinct shape of the model (calibrate_shapes()).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

from .errors import InputError
from .models import SHAPES, ModelShape, shape_from_config

GB = 1e9
#: the budgets of DESIGN.md §10 / issue 13
BUDGET = {"gpu_gb": 80.0, "host_gb": 64.0, "fisher_disk_gb": 8.0, "adapter_ratio": 4.0, "merge_cpu_min": 30.0}
#: one H100 SXM, sustained rates assumed (dense bf16 at 40 % of 989 TFLOP/s; fp64 at 50 % of 67)
GPU = {"bf16_flops": 0.4 * 989e12, "fp64_flops": 0.5 * 67e12, "fp32_flops": 0.5 * 67e12}


@dataclasses.dataclass
class Assumptions:
    """What --plan assumes when the run does not say (docs/models.md)."""

    rank: int = 16                   # r_U = r_S, on all 7 projections
    fisher_rows: int = 1024          # rows per role
    fisher_tokens: int = 512         # padded tokens per row (the batcher's max_length)
    fisher_batch: int = 4            # sstmerge.merge.fisher_inputs.compute's batch_size
    mmlu_n: int = 14042
    harmful_n: int = 520
    benign_n: int = 250
    eval_batch: int = 32
    mmlu_tokens: int = 700           # a 0-shot MMLU prompt, padded
    gen_prompt_tokens: int = 128
    max_new_tokens: int = 16
    n_methods: int = 8
    n_alphas: int = 5
    weight_bytes: int = 2            # bf16 on the GPU
    host_base_gb: float = 0.8        # python + torch + transformers in one process (measured by scale_sim)


# --------------------------------------------------------------------------- sizes

def layer_shapes(shape: ModelShape) -> list[tuple[int, int]]:
    """[O, I] of every target projection of the model (7 per decoder layer)."""
    return [oi for _ in range(shape.layers) for oi in shape.projections().values()]


def adapter_bytes(shapes, ranks) -> int:
    """A peft adapter in fp32: r (O + I) x 4 bytes per layer."""
    return sum(4 * r * (o + i) for (o, i), r in zip(shapes, ranks))


def pool_entries(o: int, i: int) -> int:
    from .fisher.restrict import pool_shape
    from .merge.fisher_inputs import POOL_MAX_ENTRIES

    po, pi = pool_shape(o, i, POOL_MAX_ENTRIES)
    return math.ceil(o / po) * math.ceil(i / pi)


def fisher_file_bytes(shapes, r: int) -> dict[str, int]:
    """Per role: diag_sub n^2 + bases (m = 2r, n = m^2), diag_pool tile means, kfac 2 m^2 + bases; fp32."""
    m = 2 * r
    n = m * m
    sub = sum(4 * (n * n + m * (o + i)) for o, i in shapes)
    pool = sum(4 * pool_entries(o, i) for o, i in shapes)
    kfac = sum(4 * (2 * m * m + m * (o + i)) for o, i in shapes)
    return {"diag_sub": sub, "diag_pool": pool, "kfac": kfac}


def fisher_tokens_elems(shape: ModelShape) -> int:
    """Elements kept per token per decoder layer at the Fisher pass's peak (docs/models.md):
    max(forward end: 10 H + 4 kv + 4 F, backward end: 9 H + 4 kv + 5 F)."""
    H, F, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    return max(10 * H + 4 * kv + 4 * F, 9 * H + 4 * kv + 5 * F)


def fisher_pass_bytes(shape: ModelShape, a: Assumptions, layers: int | None = None, act_bytes: int = 2) -> dict:
    """Peak memory of one Fisher pass on the device holding the model: weights + activations of a
    batch + logits of its counted positions (bf16 logits, fp32 copy, fp32 softmax gradient) + the
    largest per-batch [O, I] fp32 diag Fisher with its restriction temporaries + accumulators (with
    the diag_sub layers' fp32 [O, I] sums where they fit ``DENSE_SUB_MAX_BYTES``: small models only)."""
    from .fisher.estimator import DENSE_SUB_MAX_BYTES

    L = shape.layers if layers is None else layers
    tokens = a.fisher_batch * a.fisher_tokens
    weights = (shape.params() - (shape.layers - L) * _layer_params(shape)) * a.weight_bytes
    acts = tokens * L * fisher_tokens_elems(shape) * act_bytes
    logits = tokens // 2 * shape.vocab * (act_bytes + 4 + 4)
    o, i = max(shape.projections().values(), key=lambda t: t[0] * t[1])
    m = 2 * a.rank
    temp = 4 * o * i + 8 * (i + o) * m * (m + 1) // 2 + 8 * 512 * i
    acc = 7 * L * 8 * (m * m) ** 2  # diag_sub accumulators, fp64
    dense = 4 * L * sum(o * i for o, i in shape.projections().values())
    acc += dense if dense <= DENSE_SUB_MAX_BYTES else 0  # summed, then restricted once
    return {"weights": weights, "activations": acts, "logits": logits, "temporaries": temp, "accumulators": acc,
            "total": weights + acts + logits + temp + acc}


def _layer_params(shape: ModelShape) -> int:
    return sum(o * i for o, i in shape.projections().values()) + 2 * shape.hidden


def eval_bytes(shape: ModelShape, a: Assumptions) -> dict:
    """Inference: weights + merged adapter + KV cache of a generation batch + one layer's transient."""
    kv = shape.kv_heads * shape.head_dim
    weights = shape.params() * a.weight_bytes
    T = max(a.mmlu_tokens, a.gen_prompt_tokens + a.max_new_tokens)
    cache = a.eval_batch * T * shape.layers * 2 * kv * a.weight_bytes
    transient = a.eval_batch * T * (shape.hidden * 4 + 3 * shape.intermediate) * a.weight_bytes
    return {"weights": weights, "kv_cache": cache, "transient": transient, "total": weights + cache + transient}


# --------------------------------------------------------------------------- CPU merge costs

def calibrate(shape_oi: tuple[int, int] = (2048, 4096), rank: int = 16, seed: int = 0, n_alphas: int = 5,
              repeats: int = 3) -> dict:
    """Seconds per weight entry of each dense-delta method, and seconds per layer of the others, for
    a sweep of ``n_alphas`` alphas (the way exp1 runs them: :func:`sstmerge.merge.merge_sweep`),
    measured by running the methods' own code on one synthetic layer with random r-rank adapters
    and random Fisher statistics (a few seconds). Merge time is linear in O I for the dense
    methods (row blocks + a rank-(2r + 10) randomized SVD) and independent of it otherwise
    (SST's n x n pencils, n = (2r)^2, dominate; the rest is r-sized)."""
    import torch

    from . import adapters as ad
    from .fisher.restrict import pool_shape, pool_sum, restrict_diag, tile_counts
    from .merge import METHODS, needs
    from .merge.core import Context
    from .merge.fisher_inputs import FisherInputs, split_kind

    gen = torch.Generator().manual_seed(seed)
    O, I = shape_oi
    name = "model.layers.0.mlp.up_proj"

    def lora():
        return ad.LoraLayer(torch.randn(rank, I, generator=gen) / I ** 0.5, torch.randn(O, rank, generator=gen) * 0.05, 2.0)

    U = ad.LoraAdapter(None, {}, {name: lora()})
    S = ad.LoraAdapter(None, {}, {name: lora()})
    q_in, q_out = ad.joint_layer(U.layers[name], S.layers[name])
    results = {}
    from types import SimpleNamespace

    for role, kind_name in needs(list(METHODS)):  # each default method's statistic, at its default point
        kind = split_kind(kind_name)[0]
        F = torch.rand(O, I, generator=gen) ** 2
        if kind == "diag_pool":
            po, pi = pool_shape(O, I, 1 << 20)
            key = f"base_model.model.{name}.base_layer.weight"
            results[(role, kind_name)] = SimpleNamespace(kind="diag", meta={"pool": json.dumps({key: [po, pi]})},
                                                         tensors={key: pool_sum(F, po, pi) / tile_counts(O, I, po, pi)})
        elif kind == "diag_sub":
            results[(role, kind_name)] = SimpleNamespace(kind="diag", meta={}, tensors={
                f"{name}.fisher": restrict_diag(F, q_in, q_out).float(), f"{name}.q_in": q_in, f"{name}.q_out": q_out})
        elif kind == "kfac":
            m_i, m_o = q_in.shape[1], q_out.shape[1]
            X = torch.randn(m_i, 3 * m_i, generator=gen, dtype=torch.float64)
            Y = torch.randn(m_o, 3 * m_o, generator=gen, dtype=torch.float64)
            results[(role, kind_name)] = SimpleNamespace(kind="kfac", meta={}, tensors={
                f"{name}.A": (X @ X.T).float(), f"{name}.G": (Y @ Y.T).float(), f"{name}.q_in": q_in, f"{name}.q_out": q_out})
        else:
            raise InputError(f"plan calibration: no synthetic {kind_name} Fisher; add one here")
    ctx = Context(base="", utility=U, safety=S, fisher=FisherInputs(results, key="calibration"))
    from .merge import DEFAULT_ALPHAS

    alphas = [DEFAULT_ALPHAS[j % len(DEFAULT_ALPHAS)] * (1 + j // len(DEFAULT_ALPHAS)) for j in range(n_alphas)]
    out = {"n_alphas": n_alphas}
    from .merge import DEFAULT_METHODS
    from .merge.safe_lora import top_left

    V = torch.randn(O, I, generator=gen, dtype=torch.float64)
    for m in DEFAULT_METHODS:
        # the published Safe LoRA / SafeMERGE read a model pair: their adapter variants' work on the
        # factors, plus the pair's SVD (a registry model is its own aligned model: no offset to factor)
        spec = METHODS[f"{m}_adapter" if m in ("safe_lora", "safemerge") else m]
        opts = dict(spec.defaults)
        spec.run(ctx, 0.5, **opts)  # warm-up
        dt = float("inf")
        for _ in range(repeats):  # the fastest of a few: a shared 2-core VM's timings are noisy
            t0 = time.perf_counter()
            spec.run_sweep(ctx, alphas, **opts)
            if m in ("safe_lora", "safemerge"):
                top_left(V, rank, seed)
            dt = min(dt, time.perf_counter() - t0)
        dense = m in ("ties", "dare", "fisher_avg")
        out[m] = {"per_entry_s" if dense else "per_layer_s": dt / (O * I) if dense else dt}
    return out


def calibrate_shapes(shapes, rank: int = 16, n_alphas: int = 5, seed: int = 0) -> dict:
    """:func:`calibrate` at every distinct [O, I] of ``shapes`` (the per-entry cost of the dense
    methods falls with the layer's size: fixed per-block and QR costs), as ``{"n_alphas", "by_shape":
    {"OxI": {method: seconds per layer for the sweep}}}``; the fastest of two timings for large layers,
    of three for small ones (one timing of a large layer varies by up to ±25 % on a shared 2-core VM).
    ~2 min for a 7-14B model on 2 cores."""
    by_shape = {}
    for o, i in sorted(set(shapes)):
        c = calibrate((o, i), rank=rank, seed=seed, n_alphas=n_alphas, repeats=2 if o * i >= 1 << 24 else 3)
        by_shape[f"{o}x{i}"] = {m: v["per_entry_s"] * o * i if "per_entry_s" in v else v["per_layer_s"]
                                for m, v in c.items() if m != "n_alphas"}
    return {"n_alphas": n_alphas, "by_shape": by_shape}


def merge_cpu_seconds(shapes, costs: dict, n_alphas: int) -> dict[str, float]:
    """Per method, the whole alpha sweep: sum over layers of the layer's measured seconds
    (``by_shape``), or of per-entry cost x O I / per-layer cost (one calibration shape)."""
    if costs.get("n_alphas") != n_alphas:
        raise ValueError(f"merge costs were calibrated for {costs.get('n_alphas')} alphas, the grid has {n_alphas}")
    if "by_shape" in costs:
        out: dict[str, float] = {}
        for o, i in shapes:
            for m, sec in costs["by_shape"][f"{o}x{i}"].items():
                out[m] = out.get(m, 0.0) + sec
        return out
    out = {}
    for m, c in costs.items():
        if m == "n_alphas":
            continue
        out[m] = sum(c["per_entry_s"] * o * i for o, i in shapes) if "per_entry_s" in c else c["per_layer_s"] * len(shapes)
    return out


def merge_host_bytes(shapes, r: int, a: Assumptions) -> int:
    """Host peak of one method's sweep: the process, the two input adapters, the merged factors of
    every layer at every alpha (fp32, rank 2r: each set the size of the inputs), one [O, I] fp32
    result D of the largest layer and ~12 row-block arrays of 1 MB."""
    o, i = max(shapes, key=lambda t: t[0] * t[1])
    ins = adapter_bytes(shapes, [r] * len(shapes))
    return int(a.host_base_gb * GB + 2 * ins + a.n_alphas * 2 * ins + 4 * o * i + 12 * 4 * (1 << 18))


# --------------------------------------------------------------------------- the plan

def shape_for(model: str) -> tuple[ModelShape, str]:
    p = Path(model).expanduser()
    if (p / "config.json").is_file():
        return shape_from_config(json.loads((p / "config.json").read_text())), f"{p / 'config.json'}"
    if model in SHAPES:
        return SHAPES[model], "registry shapes (sstmerge.models.SHAPES)"
    raise InputError(f"--plan: no shapes for {model!r}: give a registry model ({', '.join(SHAPES)}) or a directory with config.json")


def make_plan(model: str, a: Assumptions | None = None, costs: dict | None = None, layers: int | None = None) -> dict:
    """The numbers of every stage (bytes, seconds); ``layers`` restricts to the first N decoder layers."""
    a = a or Assumptions()
    shape, source = shape_for(model)
    if layers is not None:
        shape = dataclasses.replace(shape, layers=layers)
    shapes = layer_shapes(shape)
    r = a.rank
    ins = adapter_bytes(shapes, [r] * len(shapes))
    # Safe LoRA on a registry model serves that (aligned) model with the projected dU alone: rank r
    merged_rank = {m: (r if m == "safe_lora" else 2 * r) for m in
                   ("sst", "task_arithmetic", "ties", "dare", "fisher_avg", "regmean", "safe_lora", "safemerge")}
    fisher = fisher_file_bytes(shapes, r)
    costs = costs if costs is not None else calibrate_shapes(shapes, rank=r, n_alphas=a.n_alphas)
    cpu = merge_cpu_seconds(shapes, costs, a.n_alphas)
    fpass = fisher_pass_bytes(shape, a)
    P = shape.params()
    tokens = a.fisher_rows * a.fisher_tokens
    diag_flops = sum(2 * a.fisher_tokens * o * i for o, i in shapes) * a.fisher_rows  # per-sample G_b products
    m = 2 * r
    p2 = m * (m + 1) // 2
    restrict_flops = sum(2 * o * i * p2 + 2 * o * p2 * p2 for o, i in shapes) * math.ceil(a.fisher_rows / a.fisher_batch)
    fwd_bwd = 4 * P * tokens  # forward 2P, backward to the activations 2P (no weight gradients)
    t_pass = fwd_bwd / GPU["bf16_flops"]
    # per role: a pass at the base (diag_sub@base, SST) and one at the adapter's model shared by diag_pool
    # (fisher_avg) and kfac (RegMean): sstmerge.fisher.estimate_many
    t_fisher = 2 * (2 * t_pass + 2 * diag_flops / GPU["fp32_flops"] + restrict_flops / GPU["fp64_flops"])
    n_models = 3 + a.n_methods * a.n_alphas
    eval_tokens = a.mmlu_n * a.mmlu_tokens + (a.harmful_n + a.benign_n) * (a.gen_prompt_tokens + a.max_new_tokens)
    t_eval = n_models * 2 * P * eval_tokens / GPU["bf16_flops"]
    ev = eval_bytes(shape, a)
    stages = {
        "fisher": {"gpu": fpass["total"], "host": int(a.host_base_gb * GB + fisher["diag_sub"] + 2 ** 30),
                   "disk": 2 * sum(fisher.values()), "seconds": t_fisher, "detail": fpass},
        "merge": {"gpu": 0, "host": merge_host_bytes(shapes, r, a),
                  "disk": sum(adapter_bytes(shapes, [merged_rank[mm]] * len(shapes)) for mm in merged_rank) * a.n_alphas,
                  "seconds": sum(cpu.values()), "detail": {"cpu_seconds": cpu}},
        "evaluate": {"gpu": ev["total"], "host": int(a.host_base_gb * GB + 2 * ins), "disk": 0, "seconds": t_eval,
                     "detail": ev},
    }
    return {"model": model, "source": source, "shape": dataclasses.asdict(shape), "assumptions": dataclasses.asdict(a),
            "params": P, "target_layers": len(shapes), "input_adapters_bytes": 2 * ins, "fisher_files": fisher,
            "merged_adapter_bytes": {mm: adapter_bytes(shapes, [k] * len(shapes)) for mm, k in merged_rank.items()},
            "stages": stages, "costs": costs}


def targets(p: dict) -> dict[str, tuple[float, float, bool]]:
    """(value, budget, met) per issue-13 target."""
    st = p["stages"]
    gpu = max(s["gpu"] for s in st.values()) / GB
    host = max(s["host"] for s in st.values()) / GB
    fisher = 2 * sum(p["fisher_files"].values()) / GB
    ratio = max(p["merged_adapter_bytes"].values()) / p["input_adapters_bytes"]
    minutes = st["merge"]["seconds"] / 60
    return {"peak GPU memory (GB)": (gpu, BUDGET["gpu_gb"], gpu <= BUDGET["gpu_gb"]),
            "peak host memory (GB)": (host, BUDGET["host_gb"], host <= BUDGET["host_gb"]),
            "Fisher files (GB)": (fisher, BUDGET["fisher_disk_gb"], fisher <= BUDGET["fisher_disk_gb"]),
            "merged adapter / inputs": (ratio, BUDGET["adapter_ratio"], ratio <= BUDGET["adapter_ratio"]),
            "all merges, CPU (min)": (minutes, BUDGET["merge_cpu_min"], minutes <= BUDGET["merge_cpu_min"])}


def format_plan(p: dict) -> str:
    s, a = p["shape"], p["assumptions"]
    lines = [f"plan for {p['model']} ({p['source']}): {p['params'] / 1e9:.2f}B parameters, {s['layers']} layers, "
             f"hidden {s['hidden']}, MLP {s['intermediate']}, heads {s['heads']}/{s['kv_heads']}",
             f"adapters r={a['rank']} on 7 projections x {s['layers']} layers = {p['target_layers']} layers; "
             f"inputs {p['input_adapters_bytes'] / 1e6:.0f} MB together",
             f"grid: {a['n_methods']} methods x {a['n_alphas']} alphas; Fisher {a['fisher_rows']} rows/role x "
             f"{a['fisher_tokens']} tokens, batch {a['fisher_batch']}; eval MMLU {a['mmlu_n']}, harmful {a['harmful_n']}, "
             f"benign {a['benign_n']}",
             "", f"{'stage':<10}{'GPU peak':>12}{'host peak':>12}{'disk':>12}{'time':>12}"]
    for name, st in p["stages"].items():
        where = "CPU" if name == "merge" else "GPU"
        lines.append(f"{name:<10}{st['gpu'] / GB:>9.1f} GB{st['host'] / GB:>9.1f} GB{st['disk'] / GB:>9.2f} GB"
                     f"{st['seconds'] / 60:>8.1f} min ({where})")
    f = p["stages"]["fisher"]["detail"]
    lines += ["", "fisher pass (GPU): " + ", ".join(f"{k} {v / GB:.1f} GB" for k, v in f.items()),
              "fisher files per role: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in p["fisher_files"].items()),
              "merge CPU time (all alphas): " + ", ".join(
                  f"{k} {v / 60:.1f} min" for k, v in p["stages"]["merge"]["detail"]["cpu_seconds"].items()),
              "", "targets (issue 13):"]
    for k, (v, b, ok) in targets(p).items():
        lines.append(f"  {k:<26}{v:>9.2f}  budget {b:g}  {'met' if ok else 'NOT MET'}")
    return "\n".join(lines)


def print_plan(cfg) -> int:
    """Called by exp1 --plan with its Config."""
    a = Assumptions()
    for k in ("mmlu_n", "harmful_n", "benign_n", "max_new_tokens"):
        v = getattr(cfg, k, None)
        if v is not None:
            setattr(a, k, v)
    a.n_methods = len(cfg.methods)
    a.n_alphas = len(cfg.alphas)
    for which in (cfg.utility_adapter, cfg.safety_adapter):
        if which and (Path(which) / "adapter_config.json").is_file():
            a.rank = max(a.rank if which != cfg.utility_adapter else 0,
                         int(json.loads((Path(which) / "adapter_config.json").read_text()).get("r", a.rank)))
    print(format_plan(make_plan(cfg.model, a)))
    return 0
