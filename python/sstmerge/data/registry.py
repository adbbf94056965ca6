"""The registry of real datasets, read from local files only (no download, ever).

Each entry says what the set is, where to get it, and the file name looked for. :func:`resolve` finds
the file: an explicit path, else ``$SSTMERGE_DATA_<NAME>`` (name upper-cased, ``-`` -> ``_``, e.g.
``SSTMERGE_DATA_ADVBENCH``), else ``$SSTMERGE_DATA_DIR/<file name>``; offline and absent, an
InputError says which file to provide and where it comes from.

Loaders read JSONL, JSON (a list of objects), CSV, and Parquet (when pyarrow is installed), and
normalise the real column names:

* harmful prompts (:func:`load_harmful`): AdvBench ``goal`` (llm-attacks ``harmful_behaviors.csv``) or
  ``prompt`` (walledai/AdvBench), HarmBench ``Behavior``/``behavior`` (with ``ContextString`` prepended as
  HarmBench does for contextual behaviours), or a generic ``prompt``. Output rows keep every original
  column and add ``id`` and ``prompt``.
* benign look-alikes (:func:`load_benign`): XSTest ``prompt``/``type``/``label``; only ``label == "safe"``
  rows are kept (XSTest also holds unsafe contrast prompts).
* MMLU (:func:`load_mmlu`): cais/mmlu columns ``question``, ``subject``, ``choices`` (4), ``answer``
  (0-3 or a letter), or a directory of the original Hendrycks CSVs (``<subject>_test.csv``, no header:
  question, A, B, C, D, letter).
* chat training rows (:func:`load_chat`): ``{"messages": [{"role", "content"}, ...]}``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .formats import LETTERS


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A real dataset: its kind (harmful / benign / mmlu / chat), the file looked for, and its source."""

    name: str
    kind: str
    filename: str
    source: str
    notes: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "advbench": DatasetSpec("advbench", "harmful", "harmful_behaviors.csv",
                            "https://github.com/llm-attacks/llm-attacks/blob/main/data/advbench/harmful_behaviors.csv "
                            "(or the walledai/AdvBench dataset)", "520 behaviours; columns goal, target"),
    "harmbench": DatasetSpec("harmbench", "harmful", "harmbench_behaviors_text_all.csv",
                             "https://github.com/centerforaisafety/HarmBench/tree/main/data/behavior_datasets",
                             "columns Behavior, FunctionalCategory, SemanticCategory, ContextString, BehaviorID"),
    "xstest": DatasetSpec("xstest", "benign", "xstest_prompts.csv",
                          "https://github.com/paul-rottger/xstest (xstest_prompts.csv)",
                          "250 safe + 200 unsafe prompts; columns id, prompt, type, label; safe ones are used"),
    "mmlu": DatasetSpec("mmlu", "mmlu", "mmlu_test.jsonl",
                        "the cais/mmlu dataset, config 'all', split 'test' (14,042 rows), exported to JSONL",
                        "columns question, subject, choices, answer"),
    "mmlu-dev": DatasetSpec("mmlu-dev", "mmlu", "mmlu_dev.jsonl",
                            "the cais/mmlu dataset, config 'all', split 'dev' (5 per subject), exported to JSONL",
                            "few-shot examples"),
    "safety-train": DatasetSpec("safety-train", "chat", "safety_train.jsonl",
                                "your safety SFT set: harmful prompts answered with refusals and benign ones "
                                "answered helpfully, as chat rows",
                                "rows {'messages': [{'role': 'user', ...}, {'role': 'assistant', ...}]}"),
    "utility-train": DatasetSpec("utility-train", "mmlu", "utility_train.jsonl",
                                 "the cais/mmlu dataset, config 'auxiliary_train', exported to JSONL (or your "
                                 "own MMLU-format or chat rows)", "columns question, subject, choices, answer"),
}


def env_var(name: str) -> str:
    return "SSTMERGE_DATA_" + name.upper().replace("-", "_")


def resolve(name: str, path: str | os.PathLike | None = None) -> Path:
    """The local file of dataset ``name`` (explicit path, then the environment); InputError if absent."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise InputError(f"{name}: {p} does not exist")
        return p
    if os.environ.get(env_var(name)):
        p = Path(os.environ[env_var(name)]).expanduser()
        if not p.exists():
            raise InputError(f"{name}: {env_var(name)}={p} does not exist")
        return p
    data_dir = os.environ.get("SSTMERGE_DATA_DIR")
    if data_dir and (Path(data_dir).expanduser() / spec.filename).exists():
        return Path(data_dir).expanduser() / spec.filename
    where = f"$SSTMERGE_DATA_DIR={data_dir}" if data_dir else "$SSTMERGE_DATA_DIR (unset)"
    raise InputError(
        f"dataset {name} is not available offline: provide {spec.filename} ({spec.notes}) from {spec.source}, "
        f"by passing its path, setting {env_var(name)}=PATH, or putting it in {where}")


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL / JSON / CSV / Parquet file as dicts (CSV values are strings)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p} is not a file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = []
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{p}:{i}: not valid JSON ({e.msg})") from None
        elif suffix == ".json":
            rows = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
                rows = next(iter(rows.values()))  # {"data": [...]} style
        elif suffix == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                rows = list(csv.DictReader(f))
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise InputError(f"{p}: reading Parquet needs pyarrow (pip install pyarrow), or convert it to JSONL") from None
            rows = pq.read_table(p).to_pylist()
        else:
            raise InputError(f"{p}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    except json.JSONDecodeError as e:
        raise InputError(f"{p}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise InputError(f"{p}: not UTF-8 text") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise InputError(f"{p}: expected a list of objects (rows)")
    if not rows:
        raise InputError(f"{p} holds no rows")
    return rows


def _with_ids(rows: list[dict], stem: str) -> list[dict]:
    out = []
    for i, r in enumerate(rows):
        rid = r.get("id", r.get("BehaviorID"))
        out.append({**r, "id": str(rid) if rid not in (None, "") else f"{stem}-{i}"})
    return out


def load_harmful(path: str | os.PathLike) -> list[dict]:
    """Harmful prompts (AdvBench ``goal``, HarmBench ``Behavior``/``behavior``, or ``prompt``) with ``prompt`` set."""
    p = Path(path)
    out = []
    for i, r in enumerate(read_rows(p)):
        if r.get("prompt"):
            prompt = str(r["prompt"])
        elif r.get("goal"):
            prompt = str(r["goal"])
        elif r.get("Behavior") or r.get("behavior"):
            prompt = str(r.get("Behavior") or r.get("behavior"))
            context = r.get("ContextString") or r.get("context") or ""
            if context:
                prompt = f"{context}\n\n---\n\n{prompt}"
        else:
            raise InputError(f"{p} row {i}: no harmful prompt column (expected goal, Behavior, behavior or prompt; "
                             f"got {sorted(r)})")
        out.append({**r, "prompt": prompt})
    return _with_ids(out, p.stem)


def load_benign(path: str | os.PathLike) -> list[dict]:
    """XSTest-style benign prompts: rows with ``prompt``; rows labelled anything but ``safe`` are dropped."""
    p = Path(path)
    rows = read_rows(p)
    for i, r in enumerate(rows):
        if not r.get("prompt"):
            raise InputError(f"{p} row {i}: no 'prompt' column (XSTest columns are id, prompt, type, label)")
    kept = [r for r in rows if str(r.get("label", "safe")).strip().lower() == "safe"]
    if not kept:
        raise InputError(f"{p}: no row has label 'safe'")
    return _with_ids(kept, p.stem)


def _mmlu_row(r: dict, where: str) -> dict:
    missing = {"question", "choices", "answer"} - set(r)
    if missing:
        raise InputError(f"{where}: missing MMLU columns {sorted(missing)} (cais/mmlu: question, subject, choices, answer)")
    choices = r["choices"]
    if isinstance(choices, str):
        try:
            choices = json.loads(choices)
        except json.JSONDecodeError:
            raise InputError(f"{where}: 'choices' is not a list") from None
    if not isinstance(choices, list) or len(choices) != 4:
        raise InputError(f"{where}: 'choices' must be a list of 4 strings")
    ans = r["answer"]
    if isinstance(ans, str):
        a = ans.strip()
        ans = LETTERS.index(a) if a in LETTERS else int(a) if a.isdigit() else -1
    if not isinstance(ans, int) or not 0 <= ans <= 3:
        raise InputError(f"{where}: 'answer' must be 0-3 or A-D, got {r['answer']!r}")
    return {**r, "subject": r.get("subject") or "", "choices": [str(c) for c in choices], "answer": ans}


def load_mmlu(path: str | os.PathLike) -> list[dict]:
    """MMLU rows in cais/mmlu columns, from a file or a directory of Hendrycks ``*_test.csv``/``*_dev.csv``."""
    p = Path(path)
    if p.is_dir():
        rows = []
        files = sorted(p.glob("*.csv"))
        if not files:
            raise InputError(f"{p}: a directory of MMLU needs Hendrycks CSVs (<subject>_test.csv)")
        for f in files:
            subject = f.stem.rsplit("_", 1)[0]
            with open(f, newline="", encoding="utf-8") as fh:
                for j, rec in enumerate(csv.reader(fh)):
                    if len(rec) != 6:
                        raise InputError(f"{f} line {j + 1}: expected 6 columns (question, A, B, C, D, answer)")
                    rows.append({"question": rec[0], "subject": subject, "choices": rec[1:5], "answer": rec[5]})
    else:
        rows = read_rows(p)
    return _with_ids([_mmlu_row(r, f"{p} row {i}") for i, r in enumerate(rows)], p.stem)


def load_chat(path: str | os.PathLike) -> list[dict]:
    """Chat rows ``{"messages": [...]}`` whose last message is the assistant's."""
    p = Path(path)
    rows = read_rows(p)
    for i, r in enumerate(rows):
        msgs = r.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise InputError(f"{p} row {i}: expected {{'messages': [{{'role': ..., 'content': ...}}, ...]}}")
        if msgs[-1]["role"] != "assistant":
            raise InputError(f"{p} row {i}: the last message must be the assistant's")
    return _with_ids(rows, p.stem)


LOADERS: dict[str, Callable[[str | os.PathLike], list[dict]]] = {
    "harmful": load_harmful, "benign": load_benign, "mmlu": load_mmlu, "chat": load_chat,
}


def load(name: str, path: str | os.PathLike | None = None) -> list[dict]:
    """Resolve dataset ``name`` (see :func:`resolve`) and load it with its kind's loader.

    For ``utility-train``, chat rows are accepted as well as MMLU rows.
    """
    p = resolve(name, path)
    kind = DATASETS[name].kind
    if name == "utility-train" and p.is_file() and p.suffix == ".jsonl":
        first = read_rows(p)[0]
        if "messages" in first:
            kind = "chat"
    return LOADERS[kind](p)
