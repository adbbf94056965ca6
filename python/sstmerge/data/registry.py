"""The registry of real datasets, read from local files only (no download, ever).

Each entry says what the set is, where to get it, and the file name looked for. :func:`resolve` finds
the file: an explicit path, else ``$SSTMERGE_DATA_<NAME>`` (name upper-cased, ``-`` -> ``_``, e.g.
``SSTMERGE_DATA_ADVBENCH``), else ``$SSTMERGE_DATA_DIR/<file name>``; offline and absent, an
InputError says which file to provide and where it comes from.

Loaders read files through :mod:`sstmerge.data.files` (the one reader of the real datasets' column
names, also used by evaluation), so a file yields the same items for training, Fisher and evaluation:

* harmful prompts (:func:`load_harmful`): AdvBench ``goal`` (llm-attacks ``harmful_behaviors.csv``) or
  ``prompt`` (walledai/AdvBench), HarmBench ``Behavior``/``behavior`` (with ``ContextString`` prepended as
  HarmBench does for contextual behaviours), or a generic ``prompt``: items ``{id, prompt}``.
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
import os
from pathlib import Path
from typing import Callable

from ..errors import InputError
from .files import load_items, mmlu_items, read_rows


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


def load_harmful(path: str | os.PathLike) -> list[dict]:
    """Harmful prompts ``{id, prompt}`` (AdvBench ``goal``, HarmBench ``Behavior``, or ``prompt``)."""
    return load_items("refusal", path)


def load_benign(path: str | os.PathLike) -> list[dict]:
    """XSTest-style benign prompts ``{id, prompt, type}``; rows labelled ``unsafe`` are dropped."""
    return load_items("over-refusal", path)


def load_mmlu(path: str | os.PathLike) -> list[dict]:
    """MMLU items in cais/mmlu columns, from a file or a directory of Hendrycks ``<subject>_<split>.csv``."""
    p = Path(path)
    if not p.is_dir():
        return load_items("mmlu", p)
    files = sorted(p.glob("*.csv"))
    if not files:
        raise InputError(f"{p}: a directory of MMLU needs Hendrycks CSVs (<subject>_test.csv)")
    rows = []
    for f in files:
        subject = f.stem.rsplit("_", 1)[0]
        with open(f, newline="", encoding="utf-8") as fh:
            for j, rec in enumerate(csv.reader(fh)):
                if len(rec) != 6:
                    raise InputError(f"{f} line {j + 1}: expected 6 columns (question, A, B, C, D, answer)")
                rows.append({"question": rec[0], "subject": subject, "choices": rec[1:5], "answer": rec[5]})
    return mmlu_items(p, rows)


def load_chat(path: str | os.PathLike) -> list[dict]:
    """Chat rows ``{"messages": [...]}`` whose last message is the assistant's."""
    p = Path(path)
    rows = read_rows(p)
    if not rows:
        raise InputError(f"{p} holds no rows")
    for i, r in enumerate(rows):
        msgs = r.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
            raise InputError(f"{p} row {i}: expected {{'messages': [{{'role': ..., 'content': ...}}, ...]}}")
        if msgs[-1]["role"] != "assistant":
            raise InputError(f"{p} row {i}: the last message must be the assistant's")
    return rows


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
