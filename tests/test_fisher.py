"""sstmerge.fisher.estimate against per-sample autograd on a tiny random Llama with a random LoRA.

The references run ONE unpadded sample at a time, take autograd gradients of its summed token loss
and square / project / outer-product them; the estimator runs padded batches of mixed lengths
(right and left padding, prompt tokens labelled -100) through hooks and the ops.
"""

from __future__ import annotations

import copy
import json
import importlib.util
import warnings

import pytest
import torch
import torch.nn.functional as F

from sstmerge.errors import InputError
from sstmerge.fisher import FisherResult, NonFiniteError, estimate

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 97
HAVE_CPP_GLUE = importlib.util.find_spec("sstmerge.ops._cpp") is not None
BACKENDS = [
    "torch",
    pytest.param("cpp", marks=pytest.mark.skipif(not HAVE_CPP_GLUE, reason="sstmerge.ops._cpp not built yet")),
]


# ----------------------------------------------------------------------------- fixtures


def tiny_llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def tiny_peft(seed=0, dtype=torch.float32):
    model = peft.get_peft_model(
        tiny_llama(seed, dtype),
        # dropout > 0: the estimator must switch it off, or the exactness tests fail
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.2),
    )
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:  # peft initialises B to zero; a zero B makes lora_A's gradient zero
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def make_batches(seed=0, left_pad_last=True):
    """Three padded batches, mixed lengths, prompt tokens labelled -100; the last left-padded."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for bi, lengths in enumerate([(9, 5, 7), (12, 3), (6, 10, 4, 8)]):
        B, T = len(lengths), max(lengths)
        ids = torch.randint(1, VOCAB, (B, T), generator=gen)
        am = torch.zeros(B, T, dtype=torch.long)
        labels = torch.full((B, T), -100)
        left = left_pad_last and bi == 2
        for b, n in enumerate(lengths):
            sl = slice(T - n, T) if left else slice(0, n)
            am[b, sl] = 1
            labels[b, sl] = ids[b, sl]
            prompt = min(2 + b, n - 2)  # the first tokens are a prompt: not counted
            start = sl.start
            labels[b, start:start + prompt] = -100
        ids[am == 0] = 0
        out.append({"input_ids": ids, "attention_mask": am, "labels": labels})
    return out


def samples_of(batches):
    """The unpadded samples: (ids [1, n], labels [1, n])."""
    for bt in batches:
        for b in range(bt["input_ids"].shape[0]):
            keep = bt["attention_mask"][b].bool()
            yield bt["input_ids"][b][keep][None], bt["labels"][b][keep][None]


def sample_loss(model, ids, labels):
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def per_sample_grads(model, batches, names):
    """{name: [N, *shape]} per-sample gradients of the named parameters, one sample at a time."""
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    ps = [params[n].requires_grad_(True) for n in names]
    rows = {n: [] for n in names}
    for ids, labels in samples_of(batches):
        grads = torch.autograd.grad(sample_loss(model, ids, labels), ps)
        for n, g in zip(names, grads):
            rows[n].append(g)
    return {n: torch.stack(v) for n, v in rows.items()}


def assert_rel(got, want, tol, what=""):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = want.abs().max().item()
    assert scale > 0, f"{what}: the reference is all zeros, the test would prove nothing"
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max abs err {err:.3e} > {tol} * {scale:.3e}"


@pytest.fixture(scope="module")
def model():
    return tiny_peft()


@pytest.fixture(scope="module")
def batches():
    return make_batches()


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("backend", BACKENDS)
def test_diag_lora_equals_per_sample_loop(model, batches, backend):
    model.train()  # the estimator must force eval mode (LoRA dropout) and restore train mode
    res = estimate(model, batches, kind="diag", target="lora", backend=backend, progress=False)
    assert model.training and model.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"].training
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert sorted(res.tensors) == sorted(names)
    ref = per_sample_grads(model, batches, names)
    for n in names:
        assert_rel(res.tensors[n], (ref[n] ** 2).sum(0), 1e-5, n)
    assert res.meta["n_samples"] == "9"
    n_counted = sum(int((bt["labels"][:, 1:] != -100).sum()) for bt in batches)
    assert res.meta["n_tokens"] == str(n_counted)
    assert res.layers() == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert int(res.meta["peak_memory_bytes"]) > 0


def test_output_head_runs_only_on_counted_positions(model, batches):
    """The output head sees only positions whose next token is counted in some sample of the
    batch (transformers' logits_to_keep): with prompts labelled -100 that is fewer than T - 1, and
    the estimate still equals the per-sample loop (test above)."""
    head = model.get_output_embeddings()
    seen = []
    handle = head.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        estimate(model, batches, kind="diag", target="lora", backend="torch", progress=False)
    finally:
        handle.remove()
    want = [int((bt["labels"][:, 1:] != -100).any(0).sum()) for bt in batches]
    assert seen == want
    assert sum(want) < sum(bt["input_ids"].shape[1] - 1 for bt in batches)  # some were skipped


def test_diag_mean_reduction(model, batches):
    s = estimate(model, batches, backend="torch", progress=False)
    m = estimate(model, batches, backend="torch", progress=False, reduction="mean")
    for k in s.tensors:
        assert_rel(m.tensors[k], s.tensors[k] / 9, 1e-6, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_diag_linear_on_peft_model(model, batches, backend):
    res = estimate(model, batches, kind="diag", target="linear", backend=backend, progress=False)
    names = [n for n, _ in model.named_parameters() if n.endswith("base_layer.weight")]
    assert sorted(res.tensors) == sorted(names) and len(names) == 4
    ref = per_sample_grads(model, batches, names)
    for n in names:
        assert_rel(res.tensors[n], (ref[n] ** 2).sum(0), 1e-5, n)


def test_diag_linear_on_plain_model(batches):
    plain = tiny_llama(3)
    res = estimate(plain, batches, kind="diag", target="linear", target_modules=["o_proj", "down_proj"],
                   backend="torch", progress=False)
    names = [f"model.layers.{i}.{p}.weight" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")]
    assert sorted(res.tensors) == sorted(names)
    ref = per_sample_grads(plain, batches, names)
    for n in names:
        assert_rel(res.tensors[n], (ref[n] ** 2).sum(0), 1e-5, n)


def _orth(d, m, seed):
    q, _ = torch.linalg.qr(torch.randn(d, m, generator=torch.Generator().manual_seed(seed)))
    return q


def _subspaces(model):
    """The joint LoRA subspace plus a random direction, as the merge layer would build it."""
    subs = {}
    for i in range(2):
        for p in ("q_proj", "v_proj"):
            mod = model.base_model.model.model.layers[i].self_attn.__getattr__(p)
            A = mod.lora_A["default"].weight.detach()  # [r, I]
            Bm = mod.lora_B["default"].weight.detach()  # [O, r]
            q_in, _ = torch.linalg.qr(torch.cat([A.T, _orth(A.shape[1], 1, i)], 1))
            q_out, _ = torch.linalg.qr(Bm)
            subs[f"model.layers.{i}.self_attn.{p}"] = (q_in, q_out)
    return subs


@pytest.mark.parametrize("dense_bytes", [None, 0], ids=["summed-then-restricted", "restricted-per-batch"])
def test_bounded_diag_forms_equal_the_full_diag_restricted_and_pooled(model, batches, dense_bytes, monkeypatch):
    from sstmerge.fisher import estimator
    from sstmerge.fisher.restrict import pool_shape, restrict_diag

    if dense_bytes is not None:  # below every layer's [O, I]: the bounded path of 7-14B models
        monkeypatch.setattr(estimator, "DENSE_SUB_MAX_BYTES", dense_bytes)
    full = estimate(model, batches, kind="diag", target="linear", backend="torch", progress=False)
    subs = _subspaces(model)
    sub = estimate(model, batches, kind="diag", target="linear", subspaces=subs, backend="torch", progress=False)
    for layer, (q_in, q_out) in subs.items():
        want = restrict_diag(full[f"base_model.model.{layer}.base_layer.weight"], q_in, q_out)
        # the full F is the fp32 sum of 3 batch Fishers (<= 2 eps rel. per entry), restricted exactly in fp64; by
        # Cauchy-Schwarz on the PSD result that error is <= 2 eps x its largest (diagonal) entry; + fp32 storage.
        # Summed-then-restricted is that same computation; per batch adds only fp64 round-off.
        assert_rel(sub[f"{layer}.fisher"].double(), want, 4 * torch.finfo(torch.float32).eps, layer)
        assert torch.equal(sub[f"{layer}.q_in"], q_in.float())
    pool_max = 200  # q_proj is 32 x 32 = 1024 entries, v_proj 16 x 32 = 512: both pooled
    pooled = estimate(model, batches, kind="diag", target="linear", pool_max=pool_max, backend="torch", progress=False)
    tiles = json.loads(pooled.meta["pool"])
    assert sorted(tiles) == sorted(full)
    for name, F in full.items():
        po, pi = tiles[name]
        assert (po, pi) == pool_shape(*F.shape, pool_max) and po * pi > 1
        P = pooled[name]
        assert P.numel() <= pool_max and P.shape == (-(-F.shape[0] // po), -(-F.shape[1] // pi))
        # tile means: fp32 sums of po*pi entries per batch, then 3 batches, on both sides
        assert_rel(P, F.reshape(P.shape[0], po, P.shape[1], pi).mean((1, 3)), 2 * (po * pi + 4) * torch.finfo(torch.float32).eps, name)
    with pytest.raises(InputError, match="target='linear'"):
        estimate(model, batches, kind="diag", subspaces=subs, progress=False)
    with pytest.raises(InputError, match="give one"):
        estimate(model, batches, kind="diag", target="linear", subspaces=subs, pool_max=10, progress=False)


@pytest.mark.parametrize("fisher,samples", [("empirical", 1), ("true", 2)])
def test_estimate_many_equals_separate_estimates(model, batches, fisher, samples):
    """One shared forward/backward per batch gives each spec what its own estimate gives: the same
    graph and the same gradients at every hooked output, so equal up to the ops' summation order."""
    from sstmerge.fisher import estimate_many

    subs = _subspaces(model)
    specs = [dict(kind="diag", target="linear", pool_max=200), dict(kind="kfac", subspaces=subs),
             dict(kind="diag", target="linear", subspaces=subs), dict(kind="diag"),
             dict(kind="subspace", subspaces=subs, meta={"tag": "x"})]
    common = dict(fisher=fisher, samples=samples, seed=5, backend="torch", progress=False)
    joint = estimate_many(model, batches, specs, **common)
    assert len(joint) == len(specs)
    for spec, got in zip(specs, joint):
        want = estimate(model, batches, **spec, **common)
        assert got.kind == want.kind and sorted(got) == sorted(want)
        for k in ("options", "n_samples", "n_tokens", "pool", "params", "layers", "data_hash"):
            assert got.meta.get(k) == want.meta.get(k), k
        for name in want:
            if want[name].abs().max() > 0:
                # equal sums; only the order of fp32 additions inside the ops may differ
                assert_rel(got[name], want[name], 8 * torch.finfo(torch.float32).eps, f"{spec['kind']} {name}")
            else:
                assert torch.equal(got[name], want[name])
    assert joint[-1].meta["tag"] == "x"
    with pytest.raises(InputError, match="unknown"):
        estimate_many(model, batches, [dict(kind="diag", fisher="true")], progress=False)
    with pytest.raises(InputError, match="non-empty list"):
        estimate_many(model, batches, dict(kind="diag"), progress=False)
    with pytest.raises(InputError, match="kind must be one of"):
        estimate_many(model, batches, [dict(kind="diag"), dict(kind="full")], progress=False)


def test_accumulators_live_on_each_layers_device(model):
    """A model split by device_map puts layers on several devices; each layer's accumulator must sit
    on its own device (checked on CPU with one layer moved to the meta device, no GPU needed)."""
    from sstmerge.fisher.estimator import _Plan
    from sstmerge.fisher.hooks import find_layers

    m = copy.deepcopy(model)
    moved = m.base_model.model.model.layers[1].self_attn.v_proj
    moved.to("meta")
    for kind, target, subs in (("diag", "linear", None), ("diag", "lora", None), ("kfac", "lora", None),
                               ("diag", "linear", _subspaces(model)), ("subspace", "lora", _subspaces(model))):
        layers = find_layers(m, target, None)
        plan = _Plan(m, kind, target, layers, subs or {}, None, 0, "torch")
        on_meta = {k for k, t in plan.acc.items() if t.device.type == "meta"}
        assert on_meta and all("layers.1.self_attn.v_proj" in k for k in on_meta), (kind, target, on_meta)
        assert all(t.device.type == "cpu" for k, t in plan.acc.items() if k not in on_meta)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subspace_equals_projected_per_sample_grads(model, batches, backend):
    subs = _subspaces(model)
    res = estimate(model, batches, kind="subspace", subspaces=subs, backend=backend, progress=False)
    names = {layer: f"base_model.model.{layer}.base_layer.weight" for layer in subs}
    # the gradient w.r.t. the base weight IS the gradient w.r.t. the effective weight W0 + s B A
    ref = per_sample_grads(model, batches, list(names.values()))
    for layer, (q_in, q_out) in subs.items():
        S = q_out.T @ ref[names[layer]] @ q_in  # [N, m_o, m_i]
        v = S.reshape(S.shape[0], -1)
        assert_rel(res.tensors[f"{layer}.fisher"], v.T @ v, 1e-5, layer)
        assert torch.equal(res.tensors[f"{layer}.q_in"], q_in.float())
        assert torch.equal(res.tensors[f"{layer}.q_out"], q_out.float())
    assert res.layers() == list(subs)


def kfac_reference(model, batches, layer_mods):
    """Direct K-FAC factors: per unpadded sample, module inputs and autograd output-gradients."""
    model = copy.deepcopy(model).eval()
    mods = {n: model.get_submodule(full) for n, full in layer_mods.items()}
    A = {n: 0 for n in mods}
    G = {n: 0 for n in mods}
    for ids, labels in samples_of(batches):
        seen = {}
        hs = [m.register_forward_hook(lambda m_, a, o, n=n: seen.__setitem__(n, (a[0], o)))
              for n, m in mods.items()]
        emb_h = model.get_input_embeddings().register_forward_hook(lambda m_, a, o: o.requires_grad_(True))
        loss = sample_loss(model, ids, labels)
        for h in hs + [emb_h]:
            h.remove()
        gs = torch.autograd.grad(loss, [seen[n][1] for n in mods])
        for (n, (x, _)), g in zip(seen.items(), gs):
            x, g = x[0].detach(), g[0]
            A[n] = A[n] + x.T @ x
            G[n] = G[n] + g.T @ g
    return A, G


@pytest.mark.parametrize("backend", BACKENDS)
def test_kfac_against_direct_computation(model, batches, backend, monkeypatch):
    layer_mods = {f"model.layers.{i}.self_attn.{p}": f"base_model.model.model.layers.{i}.self_attn.{p}"
                  for i in range(2) for p in ("q_proj", "v_proj")}
    A, G = kfac_reference(model, batches, layer_mods)
    res = estimate(model, batches, kind="kfac", backend=backend, progress=False)
    for n in layer_mods:
        assert_rel(res.tensors[f"{n}.A"], A[n], 1e-5, n + ".A")
        assert_rel(res.tensors[f"{n}.G"], G[n], 1e-5, n + ".G")
    # projected by the subspaces
    subs = _subspaces(model)
    res = estimate(model, batches, kind="kfac", subspaces=subs, backend=backend, progress=False)
    for n, (q_in, q_out) in subs.items():
        assert_rel(res.tensors[f"{n}.A"], q_in.T @ A[n] @ q_in, 1e-5, n + ".A proj")
        assert_rel(res.tensors[f"{n}.G"], q_out.T @ G[n] @ q_out, 1e-5, n + ".G proj")
    # sketched when wider than the threshold
    import sstmerge.fisher.estimator as est

    monkeypatch.setattr(est, "DENSE_MAX_WIDTH", 16)
    res = estimate(model, batches, kind="kfac", sketch_dim=5, seed=7, backend=backend, progress=False)
    again = estimate(model, batches, kind="kfac", sketch_dim=5, seed=7, backend=backend, progress=False)
    for n in layer_mods:
        assert f"{n}.A" not in res.tensors
        w_in, w_out = res.tensors[f"{n}.omega_in"], res.tensors[f"{n}.omega_out"]
        assert w_in.shape == (32, 5) and torch.equal(w_in, again.tensors[f"{n}.omega_in"])
        assert_rel(res.tensors[f"{n}.A_sketch"], A[n] @ w_in, 1e-5, n + ".A_sketch")
        assert_rel(res.tensors[f"{n}.G_sketch"], G[n] @ w_out, 1e-5, n + ".G_sketch")


def test_true_fisher_uses_seeded_model_samples(model):
    """fisher='true', K=3 == the mean over 3 draws of the per-sample loop on labels drawn, with the
    documented generator protocol, from the model's predictive distribution at counted positions."""
    batch = make_batches(5)[0]
    K, seed = 3, 11
    res = estimate(model, [batch], fisher="true", samples=K, seed=seed, backend="torch", progress=False)
    m = copy.deepcopy(model).eval()
    am = batch["attention_mask"]
    with torch.no_grad():
        pos = (am.cumsum(-1) - 1).clamp(min=0)
        logits = m(input_ids=batch["input_ids"], attention_mask=am, position_ids=pos).logits[:, :-1]
    counted = batch["labels"][:, 1:] != -100
    gen = torch.Generator().manual_seed(seed)
    names = [n for n, _ in model.named_parameters() if "lora_" in n]
    want = {n: 0 for n in names}
    for _ in range(K):
        drawn = torch.multinomial(torch.softmax(logits[counted].float(), -1), 1, generator=gen)[:, 0]
        lab = batch["labels"].clone()
        lab[:, 1:][counted] = drawn
        assert not torch.equal(lab, batch["labels"])
        ref = per_sample_grads(model, [dict(batch, labels=lab)], names)
        for n in names:
            want[n] = want[n] + (ref[n] ** 2).sum(0) / K
    for n in names:
        assert_rel(res.tensors[n], want[n], 1e-5, n)
    emp = estimate(model, [batch], backend="torch", progress=False)
    assert not torch.allclose(emp.tensors[names[0]], res.tensors[names[0]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_model_close_to_fp32(batches, backend):
    f32 = estimate(tiny_peft(2), batches, backend="torch", progress=False)
    b16 = estimate(tiny_peft(2, torch.bfloat16), batches, backend=backend, progress=False)
    for k, v in f32.tensors.items():
        assert b16.tensors[k].dtype == torch.float32
        rel = ((b16.tensors[k] - v).norm() / v.norm()).item()
        assert rel < 0.1, (k, rel)


# ----------------------------------------------------------------------------- faults


def test_nan_gradient_names_layer_and_batch(batches):
    model = tiny_peft(4)

    class NanGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    calls = {"n": 0}

    def inject(mod, args):  # NaN in the gradient below layer 1's v_proj input, in batch 1 only
        calls["n"] += 1
        return (NanGrad.apply(args[0]),) if calls["n"] == 2 else None

    v1 = model.base_model.model.model.layers[1].self_attn.v_proj
    h = v1.register_forward_pre_hook(inject)
    try:
        with pytest.raises(NonFiniteError, match=r"layer model\.layers\.0\.self_attn\.q_proj.* batch 1") as ei:
            estimate(model, batches, backend="torch", progress=False)
    finally:
        h.remove()
    assert isinstance(ei.value, InputError) and isinstance(ei.value, FloatingPointError)


def test_empty_data_raises(model):
    with pytest.raises(InputError, match="no data"):
        estimate(model, [], backend="torch", progress=False)
    with pytest.raises(InputError, match="no data"):
        estimate(model, iter(()), backend="torch", progress=False)
    b = make_batches()[0]
    with pytest.raises(InputError, match="no counted tokens"):
        estimate(model, [dict(b, labels=torch.full_like(b["labels"], -100))], backend="torch", progress=False)


def test_missing_targets_list_what_was_found(model, batches):
    plain = tiny_llama()
    with pytest.raises(InputError, match=r"no LoRA layers.*q_proj.*v_proj") as ei:
        estimate(plain, batches, target="lora", progress=False)
    assert "\n" not in str(ei.value)
    with pytest.raises(InputError, match=r"no linear layer matches.*\['qq_proj'\].*o_proj"):
        estimate(plain, batches, target="linear", target_modules=["qq_proj"], progress=False)
    with pytest.raises(InputError, match=r"no LoRA layer matches.*k_proj.*4 with LoRA"):
        estimate(model, batches, target="lora", target_modules=["k_proj"], progress=False)


def test_bad_options_raise(model, batches):
    with pytest.raises(InputError, match="kind"):
        estimate(model, batches, kind="full", progress=False)
    with pytest.raises(InputError, match="subspaces"):
        estimate(model, batches, kind="subspace", progress=False)
    with pytest.raises(InputError, match="orthonormal"):
        estimate(model, batches, kind="subspace", backend="torch", progress=False,
                 subspaces={"model.layers.0.self_attn.q_proj": (torch.ones(32, 2), _orth(32, 2, 0))})
    with pytest.raises(InputError, match="not target layers"):
        estimate(model, batches, kind="subspace", progress=False,
                 subspaces={"model.layers.0.mlp.up_proj": (_orth(32, 2, 0), _orth(64, 2, 0))})
    with pytest.raises(InputError, match="labels"):
        estimate(model, [{"input_ids": batches[0]["input_ids"]}], backend="torch", progress=False)
    bad = dict(batches[0], labels=batches[0]["labels"].masked_fill(batches[0]["labels"] >= 0, VOCAB + 3))
    with pytest.raises(InputError, match=r"batch 0: labels must be -100 or token ids in \[0, 97\)"):
        estimate(model, [bad], backend="torch", progress=False)
    with pytest.raises(InputError, match=r"batch 1: input_ids must be in \[0, 97\)"):
        estimate(model, [batches[0], dict(batches[1], input_ids=batches[1]["input_ids"] + VOCAB)],
                 backend="torch", progress=False)
    with torch.inference_mode(), pytest.raises(InputError, match="inference_mode"):
        estimate(model, batches, backend="torch", progress=False)
    with torch.no_grad():  # a caller's no_grad does not matter: the estimator enables grad itself
        assert estimate(model, batches, backend="torch", progress=False).tensors


# ----------------------------------------------------------------------------- files and cache


def test_save_load_round_trip(model, batches, tmp_path):
    res = estimate(model, batches, kind="kfac", backend="torch", progress=False, meta={"note": "x"})
    p = tmp_path / "f.safetensors"
    res.save(p)
    back = FisherResult.load(p)
    assert back.kind == "kfac" and back.meta == res.meta and back.layers() == res.layers()
    assert back.tensors.keys() == res.tensors.keys()
    for k in res.tensors:
        assert torch.equal(back.tensors[k], res.tensors[k])
    # corrupt: flip bytes in the data section
    raw = bytearray(p.read_bytes())
    raw[-8:] = b"\x7f" * 8
    p.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="corrupt"):
        FisherResult.load(p)
    p.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match="corrupt"):
        FisherResult.load(p)
    with pytest.raises(InputError, match="does not exist"):
        FisherResult.load(tmp_path / "missing.safetensors")


def test_result_is_a_read_only_mapping_and_loads_lazily(model, batches, tmp_path):
    res = estimate(model, batches, kind="kfac", backend="torch", progress=False)
    p = tmp_path / "f.safetensors"
    res.save(p)
    back = FisherResult.load(p)
    for r in (res, back):
        name = next(iter(res.tensors))
        assert name in r and "no such tensor" not in r and 0 not in r  # was KeyError: 0
        assert len(r) == len(res.tensors) and sorted(r) == sorted(res.tensors)
        assert sorted(r.keys()) == sorted(res.tensors) and torch.equal(r[name], res.tensors[name])
        with pytest.raises(KeyError):
            r["no such tensor"]
        with pytest.raises(TypeError):
            r[name] = torch.zeros(1)  # read-only
    assert not isinstance(back.tensors, dict)  # lazy: a view on the file, read tensor by tensor
    p.unlink()  # reads come from the verified file's open map, not from the path
    assert torch.equal(back[name], res.tensors[name])


def test_cache_hit_and_corrupt_recompute(model, batches, tmp_path, monkeypatch):
    import sstmerge.fisher.estimator as est

    first = estimate(model, batches, backend="torch", progress=False, cache_dir=tmp_path)
    assert first.meta["cache"].startswith("miss")
    files = list(tmp_path.glob("fisher-*.safetensors"))
    assert len(files) == 1
    real_run = est._run

    def no_run(*a, **k):
        raise AssertionError("recomputed although cached")

    monkeypatch.setattr(est, "_run", no_run)
    hit = estimate(model, batches, backend="torch", progress=False, cache_dir=tmp_path, meta={"a": "b"})
    assert hit.meta["cache"].startswith("hit") and hit.meta["a"] == "b"
    for k in first.tensors:
        assert torch.equal(hit.tensors[k], first.tensors[k])
    # other options, data or adapter weights -> another key
    with pytest.raises(AssertionError, match="recomputed"):
        estimate(model, batches[:2], backend="torch", progress=False, cache_dir=tmp_path)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight[0, 0] += 1
    with pytest.raises(AssertionError, match="recomputed"):
        estimate(other, batches, backend="torch", progress=False, cache_dir=tmp_path)
    # a corrupt entry is detected, warned about, and recomputed
    monkeypatch.setattr(est, "_run", real_run)
    raw = bytearray(files[0].read_bytes())
    raw[-4:] = b"\x00\x01\x02\x03"
    files[0].write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="corrupt cache entry"):
        again = estimate(model, batches, backend="torch", progress=False, cache_dir=tmp_path)
    assert again.meta["cache"].startswith("miss")
    for k in first.tensors:
        assert torch.equal(again.tensors[k], first.tensors[k])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FisherResult.load(files[0]).kind == "diag"  # rewritten, valid again


# ----------------------------------------------------------------------------- distributed


def _dist_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        torch.set_num_threads(1)
        model = tiny_peft()
        shard = make_batches()[rank::world]
        res = estimate(model, shard, kind="diag", backend="torch", progress=False)
        sub = estimate(model, shard, kind="subspace", subspaces=_subspaces(model), backend="torch",
                       progress=False)
        res.save(f"{out_dir}/diag{rank}.safetensors")
        sub.save(f"{out_dir}/sub{rank}.safetensors")
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_equal_single_process(model, batches, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dist_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = estimate(model, batches, kind="diag", backend="torch", progress=False)
    single_sub = estimate(model, batches, kind="subspace", subspaces=_subspaces(model), backend="torch",
                          progress=False)
    for rank in range(2):
        d = FisherResult.load(tmp_path / f"diag{rank}.safetensors")
        s = FisherResult.load(tmp_path / f"sub{rank}.safetensors")
        assert d.meta["n_samples"] == single.meta["n_samples"] and d.meta["world_size"] == "2"
        for k, v in single.tensors.items():
            assert_rel(d.tensors[k], v, 1e-5, f"rank {rank} {k}")
        for k, v in single_sub.tensors.items():
            assert_rel(s.tensors[k], v, 1e-5, f"rank {rank} {k}")


def _failing_worker(rank, world, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world)
    try:
        torch.set_num_threads(1)
        shard = make_batches()[rank::world]
        if rank == 1:  # a bad batch on rank 1 only: it raises inside the batch loop
            shard[0] = dict(shard[0], input_ids=shard[0]["input_ids"] + VOCAB)
        try:
            estimate(tiny_peft(), shard, kind="diag", backend="torch", progress=False)
            msg = "no error"
        except Exception as e:  # noqa: BLE001 - the test reads what each rank raised
            msg = f"{type(e).__name__}: {e}"
        with open(f"{out_dir}/err{rank}.txt", "w") as f:
            f.write(msg)
    finally:
        torch.distributed.destroy_process_group()


def test_a_failing_rank_is_named_on_the_others(tmp_path):
    """Rank 1 raises inside the batch loop: it re-raises its own error, and rank 0 stops with an
    error naming rank 1, not with gloo's lost connection (or, under NCCL, a hang until the
    watchdog timeout) in the accumulator all-reduce."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.spawn(_failing_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                   join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the ranks hung after rank 1 raised")
    err0, err1 = ((tmp_path / f"err{r}.txt").read_text() for r in range(2))
    assert err1.startswith("InputError") and "input_ids" in err1
    assert err0.startswith("RuntimeError") and "failed on rank(s) 1" in err0
