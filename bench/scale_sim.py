"""Shape-faithful simulation of exp1 at real scale (issue 13), on the CPU.

    python bench/scale_sim.py --model qwen2.5-14b --layers 2 [--out DIR] [--json FILE]
    python bench/scale_sim.py --model smollm2-135m --layers 1 --quick      # seconds; what the test runs

Builds N decoder layers with the registry model's true shapes (sstmerge.models.SHAPES; random fp32
weights, a small word-level tokenizer and synthetic chat data), random r=16 LoRA adapters on all 7
projections, then runs the real code: the Fisher every method needs (sstmerge.merge.fisher_inputs),
every merge method over exp1's alpha sweep (sstmerge.merge.merge_sweep, every adapter written; --quick:
the quick sweep), and an evaluation pass
(MMLU-style scoring forward + greedy generation with a merged adapter). Per stage it measures wall
time, the process's peak RSS above the stage's start (VmHWM, reset per stage), and file sizes;
extrapolates to full depth (sizes and merge times x layers); and prints them next
to ``sstmerge.plan``'s numbers for the same N layers, with the ratio sim / plan.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from sstmerge.io import cpu_model
from sstmerge.models import SHAPES

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = [f"w{i}" for i in range(400)]
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}User: "
                 "{{ message['content'] }}\n{% elif message['role'] == 'assistant' %}Assistant: "
                 "{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}Assistant:{% endif %}")


# ------------------------------------------------------------------------ measurement

def _rss_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


class Stage:
    """Wall time and peak RSS above the start of a block (VmHWM reset at entry)."""

    def __enter__(self):
        import gc

        gc.collect()
        _rss_reset()
        self.rss0 = _status("VmRSS")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.peak = _status("VmHWM") - self.rss0
        return False


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) if Path(path).is_dir() else Path(path).stat().st_size


# ------------------------------------------------------------------------ the world

def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    extra = ["User:", "Assistant:", "\n"]
    vocab = {w: i for i, w in enumerate(specials + extra + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def chat_rows(n: int, words: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(words // 2))
        a = " ".join(rng.choice(WORDS) for _ in range(words - words // 2))
        rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
    return rows


def build(root: Path, model: str, layers: int, rank: int, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[model]
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=s.hidden, intermediate_size=s.intermediate,
                      num_hidden_layers=layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                      head_dim=s.head_dim, tie_word_embeddings=s.tied, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        m = LlamaForCausalLM(cfg)
    m.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    # the "pretrained" model the base was aligned from (Safe LoRA's and SafeMERGE's pair, as for a
    # registry model): another draw of the same shapes
    torch.manual_seed(seed + 3)
    with torch.no_grad():
        LlamaForCausalLM(cfg).save_pretrained(root / "pretrained")
    for name, sd in (("utility", seed + 1), ("safety", seed + 2)):
        torch.manual_seed(sd)
        pm = get_peft_model(m, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        pm.save_pretrained(root / name)
        m = pm.unload()
    del m
    return root / "base", root / "utility", root / "safety", tok


# ------------------------------------------------------------------------ the run

def run(model: str, layers: int, *, rank: int = 16, rows: int = 16, words: int = 60, batch: int = 4,
        quick: bool = False, out: Path | None = None) -> dict:
    from sstmerge import merge as mg
    from sstmerge import plan as pl

    tmp = tempfile.TemporaryDirectory(prefix="scale_sim-") if out is None else None
    root = Path(tmp.name if tmp else out)
    root.mkdir(parents=True, exist_ok=True)
    res: dict = {"model": model, "layers": layers, "rank": rank, "rows_per_role": rows, "batch": batch,
                 "threads": torch.get_num_threads(), "cpu": cpu_model()}
    with Stage() as st:
        base, U, S, tok = build(root, model, layers, rank)
    res["build_s"] = st.seconds
    methods = list(mg.DEFAULT_METHODS)
    pair = {"align_model": str(base), "align_base": str(root / "pretrained")}
    safety, utility = chat_rows(rows, words, 1), chat_rows(rows, words, 2)
    from sstmerge.merge.fisher_inputs import compute

    with Stage() as st:
        fisher = compute(str(base), str(U), str(S), mg.needs(methods), safety_rows=safety, utility_rows=utility,
                            cache_dir=root / "fisher", backend="auto", batch_size=batch)
    files = {p.name: p.stat().st_size for p in sorted((root / "fisher").glob("*.safetensors"))}
    tokens = max(len(_ids(tok, r["messages"], False)) for r in safety + utility)
    res["fisher"] = {"seconds": st.seconds, "peak_bytes": st.peak, "files": files, "padded_tokens": tokens}
    res["merge"] = {}
    alphas = list(mg.QUICK_ALPHAS if quick else mg.DEFAULT_ALPHAS)
    res["alphas"] = alphas
    for m in methods:
        outs = [root / "merged" / f"{m}_{a:g}" for a in alphas]
        with Stage() as st:
            rs = mg.merge_sweep(m, str(base), str(U), str(S), alphas=alphas, fisher=fisher, outs=outs, seed=0,
                                **(pair if m in ("safe_lora", "safemerge") else {}))
        res["merge"][m] = {"seconds": st.seconds, "peak_bytes": st.peak,
                           "adapter_bytes": max((o / "adapter_model.safetensors").stat().st_size for o in outs),
                           "max_rank": max(f.rank for r in rs for f in r.layers.values())}
        del rs
    res["input_adapter_bytes"] = sum((p / "adapter_model.safetensors").stat().st_size for p in (U, S))
    with Stage() as st:
        res["eval_detail"] = _eval_pass(base, root / "merged" / f"sst_{alphas[-1]:g}", tok, n=4 if quick else 16)
    res["eval"] = {"seconds": st.seconds, "peak_bytes": st.peak}
    # the plan for the same N layers, with this run's data sizes, and for full depth
    a = pl.Assumptions(rank=rank, fisher_rows=rows, fisher_tokens=tokens, fisher_batch=batch, n_alphas=len(alphas))
    costs = pl.calibrate((512, 1024) if quick else (2048, 4096), rank=rank, n_alphas=len(alphas))
    res["plan_sim"] = pl.make_plan(model, a, costs=costs, layers=layers)
    res["plan_full"] = pl.make_plan(model, pl.Assumptions(rank=rank, n_alphas=len(alphas)), costs=costs)
    res["plan_fisher_cpu"] = pl.fisher_pass_bytes(dataclasses.replace(SHAPES[model], layers=layers, vocab=len(tok)),
                                                  dataclasses.replace(a, weight_bytes=4), act_bytes=4)
    if tmp:
        tmp.cleanup()
    return res


def _eval_pass(base: Path, adapter: Path, tok, n: int) -> dict:
    from peft import PeftModel

    from sstmerge.eval.generate import greedy_batch
    from sstmerge.models import load_model

    model, _ = load_model(str(base))
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    prompts = [_ids(tok, r["messages"][:1], True) for r in chat_rows(n, 40, 3)]
    with torch.inference_mode():
        out = greedy_batch(model, prompts, max_new_tokens=8, eos_ids={tok.eos_token_id}, pad_id=tok.pad_token_id)
    return {"prompts": n, "generated_tokens": sum(len(o) for o in out)}


def _ids(tok, messages, gen: bool) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------ report

def table(res: dict) -> str:
    s = SHAPES[res["model"]]
    N, L = res["layers"], s.layers
    k = L / N
    ps, pf = res["plan_sim"], res["plan_full"]
    GB, MB = 1e9, 1e6
    lines = [f"## {res['model']}: {N} of {L} layers measured (hidden {s.hidden}, MLP {s.intermediate}, heads "
             f"{s.heads}/{s.kv_heads}), r={res['rank']} on 7 projections; {res['threads']} thread(s), {res['cpu']}",
             "", "| quantity | measured (N layers) | plan (N layers) | sim/plan | extrapolated x L/N | plan (full) |",
             "|---|---:|---:|---:|---:|---:|"]

    def row(name, meas, plan_n, extra, plan_full, unit, scale):
        ratio = f"{meas / plan_n:.2f}" if plan_n else "-"
        lines.append(f"| {name} | {meas / scale:.3g} {unit} | {plan_n / scale:.3g} {unit} | {ratio} | "
                     f"{extra / scale:.3g} {unit} | {plan_full / scale:.3g} {unit} |")

    fisher_meas = sum(res["fisher"]["files"].values())
    fisher_plan = 2 * sum(ps["fisher_files"].values())
    row("Fisher files (all)", fisher_meas, fisher_plan, fisher_meas * k, 2 * sum(pf["fisher_files"].values()), "GB", GB)
    pc = res["plan_fisher_cpu"]
    row("Fisher peak RSS (fp32, CPU)", res["fisher"]["peak_bytes"], pc["total"], float("nan"), pf["stages"]["fisher"]["gpu"], "GB", GB)
    lines.append(f"| Fisher wall time | {res['fisher']['seconds']:.0f} s | - | - | - | "
                 f"{pf['stages']['fisher']['seconds'] / 60:.0f} min (H100) |")
    cpu = ps["stages"]["merge"]["detail"]["cpu_seconds"]
    cpu_full = pf["stages"]["merge"]["detail"]["cpu_seconds"]
    nal = len(res["alphas"])
    tot_meas = 0.0
    for m, r in res["merge"].items():
        tot_meas += r["seconds"]
        row(f"merge {m}: time ({nal} alphas)", r["seconds"], cpu[m], r["seconds"] * k, cpu_full[m], "s", 1)
    row("all merges, CPU (grid)", tot_meas, sum(cpu.values()), tot_meas * k, sum(cpu_full.values()), "min", 60)
    peak = max(r["peak_bytes"] for r in res["merge"].values())
    row("merge peak RSS (max method)", peak, ps["stages"]["merge"]["host"] - ps["assumptions"]["host_base_gb"] * GB,
        peak, pf["stages"]["merge"]["host"], "GB", GB)
    big = max(r["adapter_bytes"] for r in res["merge"].values())
    row("largest merged adapter", big, max(ps["merged_adapter_bytes"].values()), big * k,
        max(pf["merged_adapter_bytes"].values()), "MB", MB)
    lines.append(f"| merged / inputs (max) | {big / res['input_adapter_bytes']:.2f} | "
                 f"{max(ps['merged_adapter_bytes'].values()) / ps['input_adapters_bytes']:.2f} | | | "
                 f"{max(pf['merged_adapter_bytes'].values()) / pf['input_adapters_bytes']:.2f} |")
    lines.append(f"| eval pass ({res['eval_detail']['prompts']} prompts) | {res['eval']['seconds']:.1f} s, "
                 f"{res['eval']['peak_bytes'] / GB:.2f} GB | - | - | - | {pf['stages']['evaluate']['gpu'] / GB:.1f} GB GPU |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python bench/scale_sim.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, help="adapter rank (default 16; 4 with --quick)")
    p.add_argument("--rows", type=int, default=16, help="Fisher rows per role")
    p.add_argument("--quick", action="store_true", help="tiny data (4 rows, 20 words), rank 4, a small calibration: for tests")
    p.add_argument("--out", type=Path, help="keep the run's files here (default: a temporary directory)")
    p.add_argument("--json", type=Path, help="write the measurements here")
    a = p.parse_args(argv)
    if a.rank is None:
        a.rank = 4 if a.quick else 16
    if a.layers < 1 or a.rank < 1 or a.rows < 1:
        print("scale_sim: --layers, --rank and --rows must be positive", file=sys.stderr)
        return 2
    res = run(a.model, a.layers, rank=a.rank, rows=4 if a.quick else a.rows, words=20 if a.quick else 60,
              quick=a.quick, out=a.out)
    print(table(res))
    if a.json:
        a.json.write_text(json.dumps(res, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
