"""Command line: ``python -m sstmerge.eval {mmlu,refusal,over-refusal} --model M --data FILE --out FILE.jsonl``.

Evaluates one model (optionally with one peft LoRA adapter) on one data file, writes the per-item
records as JSONL (atomically, rank 0 only), and prints the score with its Wilson 95% interval and the
throughput (items/s, model loading excluded). Under ``torchrun`` the items are sharded across ranks.
Bad input (arguments, data files, models, adapters): one line on stderr, exit status 2, no output file.

    python -m sstmerge.eval mmlu --model tiny --data mmlu_test.jsonl --out mmlu.jsonl [--k-shot 5 --dev-data mmlu_dev.jsonl]
    python -m sstmerge.eval refusal --model llama-3.1-8b --adapter out/merged --data harmful_behaviors.csv --out refusal.jsonl
    python -m sstmerge.eval over-refusal --model llama-3.1-8b --data xstest_prompts.csv --out xstest.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from sstmerge.errors import CliParser, InputError, cli_main
from sstmerge.data.files import load_items
from sstmerge.eval.dist import is_main
from sstmerge.eval.summary import per_subject, summarize


def build_parser() -> argparse.ArgumentParser:
    from sstmerge.eval.vllm_backend import vllm_status  # noqa: PLC0415

    backends = ["hf"] + (["vllm"] if vllm_status()[0] else [])
    p = CliParser(prog="python -m sstmerge.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=["mmlu", "refusal", "over-refusal"])
    p.add_argument("--model", required=True, help="registry name (tiny, mistral-7b, ...), local directory or HF id")
    p.add_argument("--adapter", help="peft LoRA adapter directory to apply to the model")
    p.add_argument("--data", required=True, help="JSONL / JSON / CSV / parquet in the real datasets' column names")
    p.add_argument("--out", required=True, help="per-item records (JSONL)")
    p.add_argument("--summary", help="also write the score summary here (JSON)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-batch-tokens", type=int, default=None, help="MMLU: bound each batch's padded tokens")
    p.add_argument("--max-new-tokens", type=int, default=256, help="refusal tasks: generation limit")
    p.add_argument("--k-shot", type=int, default=0, help="MMLU: shots from --dev-data (first k of the subject)")
    p.add_argument("--dev-data", help="MMLU dev split (for --k-shot > 0)")
    p.add_argument("--judge", help="refusal judge: file.py defining judge(prompt, output) or module:function "
                                   "(default: the keyword detector)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N items")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: loader's choice)")
    p.add_argument("--backend", choices=backends, default="hf",
                   help="generation backend" + ("" if len(backends) > 1 else " (vllm: not available here: " + vllm_status()[1] + ")"))
    return p


def _check_args(a) -> None:
    if a.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if a.limit is not None and a.limit < 1:
        raise InputError(f"--limit must be >= 1, got {a.limit}")
    if a.max_batch_tokens is not None and a.max_batch_tokens < 1:
        raise InputError(f"--max-batch-tokens must be >= 1, got {a.max_batch_tokens}")
    if a.task == "mmlu":
        if a.k_shot < 0:
            raise InputError(f"--k-shot must be >= 0, got {a.k_shot}")
        if a.k_shot > 0 and not a.dev_data:
            raise InputError(f"--k-shot {a.k_shot} needs --dev-data (the MMLU dev split)")
        if a.judge or a.backend != "hf":
            raise InputError("--judge and --backend apply to the refusal tasks, not mmlu")
    elif a.k_shot or a.dev_data:
        raise InputError("--k-shot and --dev-data apply to mmlu only")
    out = Path(a.out)
    if out.exists() and out.is_dir():
        raise InputError(f"--out {out} is a directory; give a file path")


def _init_distributed():
    """Initialise torch.distributed under torchrun (WORLD_SIZE > 1); return this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if world > 1 and not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(local)
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    return f"cuda:{local}" if cuda else "cpu"


def load_model_and_adapter(model_name: str, adapter: str | None, *, dtype=None, device=None):
    """The model (via sstmerge.models.load_model) with ``adapter`` applied; the adapter directory is
    checked before the model loads, and against the model's linear layers after."""
    from sstmerge.adapters import check_against_base, load_adapter  # noqa: PLC0415
    from sstmerge.models import load_model  # noqa: PLC0415 - the loader every layer uses

    lora = load_adapter(adapter, what="--adapter") if adapter else None
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    if adapter:
        from peft import PeftModel  # noqa: PLC0415

        shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        check_against_base(lora, shapes, str(model_name), "--adapter")
        try:
            model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
        except (ValueError, RuntimeError, KeyError, OSError) as e:
            raise InputError(f"--adapter {adapter} does not load onto {model_name}: {type(e).__name__}: {e}") from None
        model.eval()
    return model, tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    from sstmerge.worlds import resolve_model  # noqa: PLC0415 - a world name ("tiny") -> its base model dir

    a = build_parser().parse_args(argv)
    _check_args(a)
    items = load_items(a.task, a.data)
    if a.limit:
        items = items[: a.limit]
    dev = load_items("mmlu", a.dev_data) if a.task == "mmlu" and a.dev_data else None
    judge = None
    if a.task != "mmlu":
        from sstmerge.eval.refusal import load_judge  # noqa: PLC0415

        judge = load_judge(a.judge)  # a bad judge fails before the model loads
    device = _init_distributed()
    a.model = resolve_model(a.model)
    if a.task == "mmlu":
        from sstmerge.eval.mmlu import fewshot_examples  # noqa: PLC0415

        fewshot_examples(items, dev, a.k_shot)  # missing shots fail before the model loads

    if a.backend == "vllm":
        from sstmerge.eval.vllm_backend import evaluate_refusal_vllm  # noqa: PLC0415

        t0 = time.perf_counter()
        records = evaluate_refusal_vllm(a.model, a.adapter, [it["prompt"] for it in items], [it["id"] for it in items],
                                        max_new_tokens=a.max_new_tokens, judge=judge)
        elapsed = time.perf_counter() - t0
    else:
        model, tokenizer = load_model_and_adapter(a.model, a.adapter, dtype=a.dtype, device=device)
        t0 = time.perf_counter()
        if a.task == "mmlu":
            from sstmerge.eval.mmlu import evaluate_mmlu  # noqa: PLC0415

            records = evaluate_mmlu(model, tokenizer, items, k_shot=a.k_shot, dev_items=dev, batch_size=a.batch_size,
                                    max_batch_tokens=a.max_batch_tokens)
        else:
            from sstmerge.eval.refusal import evaluate_refusal  # noqa: PLC0415

            records = evaluate_refusal(model, tokenizer, [it["prompt"] for it in items], [it["id"] for it in items],
                                       max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, judge=judge)
        elapsed = time.perf_counter() - t0

    if not is_main():
        return 0
    key = "correct" if a.task == "mmlu" else "refused"
    summary = summarize(records, key)
    summary.update(task=a.task, model=a.model, adapter=a.adapter, data=str(a.data), items_per_s=len(records) / elapsed,
                   seconds=elapsed)
    if a.task == "mmlu":
        summary["per_subject"] = per_subject(records)
    from sstmerge.io import write_json, write_jsonl  # noqa: PLC0415

    write_jsonl(a.out, records)
    if a.summary:
        write_json(a.summary, summary)
    name = {"mmlu": "accuracy", "refusal": "refusal rate", "over-refusal": "over-refusal rate"}[a.task]
    lo, hi = summary["ci95"]
    print(f"{a.task}: {name} {summary['score']:.4f} (95% CI {lo:.4f}-{hi:.4f}, Wilson; "
          f"{summary['count']}/{summary['n']}) | {summary['items_per_s']:.2f} items/s ({elapsed:.1f} s) | wrote {a.out}")
    if a.task == "mmlu" and len(summary["per_subject"]) > 1:
        for subject, s in summary["per_subject"].items():
            print(f"  {subject}: {s['score']:.4f} ({s['count']}/{s['n']})")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main))
