"""One SmolLM2-world safety-adapter trial: retrain only the safety adapter with other settings and
measure it on dev, alone and summed with a given utility adapter (task arithmetic, α = 1).

    python bench/smol_safety_trial.py --config '{"safety_loss_weighting": "row"}' \\
        --utility-adapter <cache>/smol-<key>/utility_adapter [--train-templates 10] [--split dev]

The data and training go through the world's own code (``smol.generate_data``, ``smol.base_answers``,
``base_letters``, ``smol.safety_rows``, ``train_lora`` with the stage's seed and settings), so a trial
with a config equal to the default trains the default world's safety adapter. ``--train-templates N``
phrases the training requests with the first N train templates only (recipe 2 had 10). The base's
answers are cached in ``--work`` (keyed by prompt) so trials share them. Prints one JSON line: base+S and
TA MMLU / refusal / over-refusal in %, and over-refusal per ``--split`` template.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import random
import time
from pathlib import Path


def per_template(records: list[dict], rows: list[dict], templates) -> dict[int, float]:
    """Refusal rate (%) per template of ``rows`` (matched by the filled prompt)."""
    from sstmerge.worlds import smol_data as D

    groups = collections.defaultdict(list)
    for rec, row in zip(records, rows):
        j = next(i for i, t in enumerate(templates) if D._fill(t, row["task"]) == row["prompt"])
        groups[j].append(int(rec["refused"]))
    return {j: round(100 * sum(v) / len(v), 1) for j, v in sorted(groups.items())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="{}", help="smol.Config fields to change (JSON)")
    p.add_argument("--utility-adapter", required=True, help="the utility adapter task arithmetic adds")
    p.add_argument("--train-templates", type=int, help="use only the first N train templates")
    p.add_argument("--split", choices=("dev", "test"), default="dev")
    p.add_argument("--work", default="runs/smol-safety-trials", help="base answers cache and adapters")
    p.add_argument("--name", default="trial")
    a = p.parse_args()

    from peft import PeftModel

    from sstmerge import eval as ev
    from sstmerge.models import load_model
    from sstmerge.train import train_lora
    from sstmerge.worlds import smol, smol_data as D
    from sstmerge.worlds.base import base_letters

    if a.train_templates:
        D.REQUEST_TEMPLATES["train"] = tuple(D.REQUEST_TEMPLATES["train"][:a.train_templates])
    cfg = dataclasses.replace(smol.Config(), **json.loads(a.config))
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    base_dir = smol.base_model_dir()
    data = smol.generate_data(cfg)
    prompts = smol.answered_prompts(cfg, data)
    cache_f = work / f"answers-{cfg.answer_tokens}.json"
    cache = json.loads(cache_f.read_text()) if cache_f.exists() else {"answers": {}}
    missing = [q for q in prompts if q not in cache["answers"]]
    if missing:
        cache["answers"].update(zip(missing, smol.base_answers(base_dir, missing, cfg.answer_tokens, True)))
    retain = D.sample(data["utility_train"], cfg.retain_quizzes, random.Random(cfg.seed + 3))
    cache.setdefault("retain", {})
    key = str(cfg.retain_quizzes)
    if key not in cache["retain"]:
        cache["retain"][key] = base_letters(base_dir, retain)[0]
    cache_f.write_text(json.dumps(cache))
    rows = smol.safety_rows(cfg, data, cache["answers"], cache["retain"][key])

    out = work / f"safety-{a.name}"
    t0 = time.perf_counter()
    base, tok = load_model(base_dir, device="cpu")
    train_lora(base, rows, out, steps=cfg.safety_steps, lr=cfg.safety_lr, seed=cfg.seed + 2, tokenizer=tok,
               r=cfg.lora_r, alpha=cfg.lora_alpha, target_modules=cfg.target_modules, batch_size=cfg.batch_size,
               loss_weighting=cfg.safety_loss_weighting, desc="safety adapter")
    result = {"name": a.name, "config": json.loads(a.config), "train_templates": len(D.REQUEST_TEMPLATES["train"]),
              "rows": len(rows), "refused_by_base": len(smol.refused_by_base(cfg, data, cache["answers"])),
              "train_s": round(time.perf_counter() - t0)}
    harmful, benign = D.harmful_items(a.split), D.benign_items(a.split)
    mmlu = D.quiz_items(a.split)
    for label, adapters in (("safety", [out]), ("ta", [Path(a.utility_adapter), out])):
        model, tok = load_model(base_dir, device="cpu")
        for ad in adapters:
            model = PeftModel.from_pretrained(model, str(ad)).merge_and_unload()
        model.eval()
        kw = dict(max_new_tokens=smol.EVAL_DEFAULTS["max_new_tokens"], batch_size=smol.EVAL_DEFAULTS["batch_size"])
        s = ev.evaluate_refusal(model, tok, [r["prompt"] for r in harmful], **kw)
        o = ev.evaluate_refusal(model, tok, [r["prompt"] for r in benign], **kw)
        u = ev.evaluate_mmlu(model, tok, mmlu, batch_size=kw["batch_size"])
        result[label] = {"mmlu": round(100 * sum(r["correct"] for r in u) / len(u), 1),
                         "refusal": round(100 * sum(r["refused"] for r in s) / len(s), 1),
                         "over_refusal": round(100 * sum(r["refused"] for r in o) / len(o), 1),
                         "over_refusal_by_template": per_template(o, benign, D.REQUEST_TEMPLATES[a.split])}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
