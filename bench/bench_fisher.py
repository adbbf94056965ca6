"""Diagonal Fisher of the LoRA parameters of a tiny Llama: sstmerge.fisher.estimate vs its peers.

Problem: the LoRA (r=8 on q_proj, v_proj) diagonal Fisher  F = sum_b g_b * g_b  (g_b the per-sample
gradient of the sample's summed token loss) of a 4-layer, d=128 random Llama, B=32 sequences of
T=64 tokens (equal lengths, so torch.func.vmap can run the same problem without a padding mask).

  estimate_cpp    sstmerge.fisher.estimate(kind="diag", backend="cpp"): one forward/backward per
                  batch of 8, hooks + the diag_fisher_linear kernel
  loop            one sample at a time: forward, torch.autograd.grad, square, add
  vmap            torch.func.vmap(torch.func.grad(loss)) over the batch of 8 (per-sample gradients
                  materialised for the LoRA parameters), square, sum

All three are checked to agree (1e-4 relative) before timing. Run:

    python -m pytest bench/bench_fisher.py --benchmark-only --benchmark-group-by=group -q -s

``test_speedup`` times the three with one median-of-N helper and asserts the DESIGN.md §8 target:
estimate_cpp >= 5x faster than the loop and faster than vmap; it prints the measured ratios.
"""

from __future__ import annotations

import platform
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from sstmerge.fisher import estimate
from sstmerge.ops import backends

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

B, T, MB, VOCAB = 32, 64, 8, 256


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=4, vocab_size=VOCAB,
                                   max_position_embeddings=128)
    model = peft.get_peft_model(transformers.LlamaForCausalLM(cfg),
                                peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model.eval()


def _batches():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T), generator=gen)
    labels = ids.clone()
    labels[:, :8] = -100  # a prompt
    return [{"input_ids": ids[i:i + MB], "attention_mask": torch.ones(MB, T, dtype=torch.long),
             "labels": labels[i:i + MB]} for i in range(0, B, MB)]


def _loss(model, ids, labels):
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def run_estimate(model, batches, backend="cpp"):
    return estimate(model, batches, kind="diag", backend=backend, progress=False).tensors


def run_loop(model, batches):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    ps = [p for _, p in model.named_parameters() if p.requires_grad]
    acc = [torch.zeros_like(p) for p in ps]
    for bt in batches:
        for b in range(bt["input_ids"].shape[0]):
            grads = torch.autograd.grad(_loss(model, bt["input_ids"][b:b + 1], bt["labels"][b:b + 1]), ps)
            for a, g in zip(acc, grads):
                a.add_(g * g)
    return dict(zip(names, acc))


def run_vmap(model, batches):
    from torch.func import functional_call, grad, vmap

    lora = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update(dict(model.named_buffers()))

    def loss(params, ids, labels):
        logits = functional_call(model, (params, frozen), args=(), kwargs={
            "input_ids": ids[None], "use_cache": False}).logits[0, :-1]
        return F.cross_entropy(logits.float(), labels[1:], ignore_index=-100, reduction="sum")

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    acc = {n: torch.zeros_like(p) for n, p in lora.items()}
    for bt in batches:
        gs = per_sample(lora, bt["input_ids"], bt["labels"])
        for n, g in gs.items():
            acc[n] += (g * g).sum(0)
    return acc


@pytest.fixture(scope="module")
def setup():
    if not backends()["cpp"].usable:
        pytest.skip(f"cpp backend not usable: {backends()['cpp'].reason}")
    model, batches = _model(), _batches()
    ref = run_loop(model, batches)
    for name, got in (("estimate_cpp", run_estimate(model, batches)), ("vmap", run_vmap(model, batches))):
        for k, v in ref.items():
            err = (got[k] - v).abs().max() / v.abs().max()
            assert err < 1e-4, (name, k, float(err))
    return model, batches


def _row():
    return (f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"cpp {backends()['cpp'].detail}, fp32, B={B} T={T} d=128 layers=4 r=8 q,v")


@pytest.mark.benchmark(group="fisher-diag-tiny-llama")
def test_estimate_cpp(benchmark, setup):
    benchmark.extra_info["config"] = _row()
    benchmark.pedantic(run_estimate, args=setup, rounds=7, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="fisher-diag-tiny-llama")
def test_per_sample_loop(benchmark, setup):
    benchmark.pedantic(run_loop, args=setup, rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.benchmark(group="fisher-diag-tiny-llama")
def test_vmap(benchmark, setup):
    benchmark.pedantic(run_vmap, args=setup, rounds=5, iterations=1, warmup_rounds=1)


def _median(fn, *args, rounds):
    fn(*args)  # warm-up
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def test_speedup(setup):
    t_est = _median(run_estimate, *setup, rounds=7)
    t_loop = _median(run_loop, *setup, rounds=3)
    t_vmap = _median(run_vmap, *setup, rounds=5)
    t_torch = _median(lambda m, b: run_estimate(m, b, "torch"), *setup, rounds=5)
    print(f"\n{_row()}\n"
          f"  estimate(cpp)   {t_est * 1e3:8.1f} ms  1.00x\n"
          f"  estimate(torch) {t_torch * 1e3:8.1f} ms  {t_torch / t_est:5.2f}x\n"
          f"  vmap            {t_vmap * 1e3:8.1f} ms  {t_vmap / t_est:5.2f}x\n"
          f"  per-sample loop {t_loop * 1e3:8.1f} ms  {t_loop / t_est:5.2f}x")
    assert t_loop >= 5 * t_est, f"loop/estimate = {t_loop / t_est:.2f} < 5"
    assert t_vmap > t_est, f"vmap/estimate = {t_vmap / t_est:.2f} <= 1"
