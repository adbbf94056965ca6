"""Data files in the real datasets' column names: the one reader of them.

sstmerge.eval (and its command line), sstmerge.data.registry and exp1 all read harmful, benign and MMLU
files through :func:`load_items`, and other row files through :func:`read_rows`, so the same file means
the same items everywhere.

``load_items(kind, path)`` reads JSONL, JSON (a list of rows), CSV, or parquet (only when pyarrow is
installed; otherwise an InputError says so) and returns a list of plain dicts:

- ``kind="mmlu"`` (cais/mmlu): columns ``question``, ``subject``, ``choices`` (4 strings; in CSV a JSON
  list, or four columns ``A``, ``B``, ``C``, ``D``), ``answer`` (0-3, or a letter ``A``-``D``).
  Items: ``{id, subject, question, choices, answer}``.
- ``kind="refusal"`` (harmful prompts): AdvBench ``goal`` (``target`` ignored), HarmBench ``Behavior``
  (with ``ContextString`` prepended the way HarmBench does for contextual behaviours, and
  ``BehaviorID`` as the id), or a generic ``prompt`` column. Items: ``{id, prompt}``.
- ``kind="over-refusal"`` (benign prompts that look risky): XSTest ``prompt``, ``type``, ``label``;
  when a ``label`` column is present only the rows labelled ``safe`` are kept (XSTest's unsafe
  contrast prompts *should* be refused and measure safety, not over-refusal). Items:
  ``{id, prompt}`` plus ``type`` when present.

``id`` is the file's ``id`` column when present (HarmBench: ``BehaviorID``), else the 0-based row
number in the file. Ids must be unique, so two models' records can be joined item by item.

Every problem (missing file, unreadable or malformed file, empty file, missing columns, an answer out
of range, not 4 choices, an empty prompt, duplicate ids) is an :class:`~sstmerge.errors.InputError`
whose one-line message names the file and the problem.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from sstmerge.errors import InputError

KINDS = ("mmlu", "refusal", "over-refusal")
_LETTER_TO_INDEX = {"A": 0, "B": 1, "C": 2, "D": 3}


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a JSONL / JSON (a list of objects) / CSV / TSV / Parquet file as dicts."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such data file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq  # noqa: PLC0415 - optional dependency
        except ImportError:
            raise InputError(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or convert the file to JSONL") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise InputError(f"{path}: unreadable parquet file ({type(e).__name__}: {e})") from None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e.strerror})") from None
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}: line {lineno} is not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"{path}: line {lineno} is not a JSON object")
            rows.append(row)
        return rows
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise InputError(f"{path}: a .json data file must hold a list of objects (rows)")
        return data
    if suffix in (".csv", ".tsv"):
        try:
            reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
            rows = [dict(r) for r in reader]
        except csv.Error as e:
            raise InputError(f"{path}: malformed CSV ({e})") from None
        for i, r in enumerate(rows):
            if None in r:  # more fields than the header
                raise InputError(f"{path}: row {i} has more fields than the header")
        return rows
    raise InputError(f"{path}: unknown data format {suffix or '(no extension)'!r}; use .jsonl, .json, .csv, .tsv or .parquet")


def _need(path: Path, rows: list[dict], columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        found = ", ".join(sorted(rows[0])) or "none"
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} for {what} (found: {found})")


def _ids(path: Path, rows: list[dict], id_column: str) -> list[Any]:
    if id_column in rows[0]:
        ids = [r.get(id_column) for r in rows]
        for i, v in enumerate(ids):
            if v is None or (isinstance(v, str) and not v.strip()):
                raise InputError(f"{path}: row {i} has an empty {id_column}")
    else:
        ids = list(range(len(rows)))
    seen: set = set()
    for v in ids:
        if v in seen:
            raise InputError(f"{path}: duplicate {id_column} {v!r}; ids must be unique to compare models item by item")
        seen.add(v)
    return ids


def _choices(path: Path, i: int, row: dict) -> list[str]:
    if "choices" in row:
        c = row["choices"]
        if isinstance(c, str):
            try:
                c = json.loads(c)
            except json.JSONDecodeError:
                raise InputError(f"{path}: row {i}: choices must be a list of 4 strings (in CSV: a JSON list)") from None
        if hasattr(c, "tolist"):  # numpy arrays from parquet readers
            c = c.tolist()
    elif all(k in row for k in "ABCD"):
        c = [row[k] for k in "ABCD"]
    else:
        raise InputError(f"{path}: missing column choices (or A, B, C, D) for MMLU items (found: {', '.join(sorted(row))})")
    if not isinstance(c, (list, tuple)) or len(c) != 4:
        n = len(c) if isinstance(c, (list, tuple)) else type(c).__name__
        raise InputError(f"{path}: row {i}: MMLU needs exactly 4 choices, got {n}")
    return [str(x) for x in c]


def _answer(path: Path, i: int, a: Any) -> int:
    if isinstance(a, str):
        s = a.strip()
        if s.upper() in _LETTER_TO_INDEX and len(s) == 1:
            return _LETTER_TO_INDEX[s.upper()]
        try:
            a = int(s)
        except ValueError:
            raise InputError(f"{path}: row {i}: answer {a!r} is not 0-3 or A-D") from None
    if isinstance(a, bool) or not isinstance(a, int):
        if isinstance(a, float) and a.is_integer():
            a = int(a)
        else:
            raise InputError(f"{path}: row {i}: answer {a!r} is not 0-3 or A-D")
    if not 0 <= a <= 3:
        raise InputError(f"{path}: row {i}: answer {a} out of range 0-3")
    return a


def _text(path: Path, i: int, v: Any, column: str) -> str:
    if v is None or not isinstance(v, str) or not v.strip():
        raise InputError(f"{path}: row {i}: empty or non-text {column}")
    return v


def mmlu_items(path: Path, rows: list[dict]) -> list[dict[str, Any]]:
    """Validated MMLU items ``{id, subject, question, choices, answer}`` from cais/mmlu-style rows."""
    _need(path, rows, ("question", "subject", "answer"), "MMLU items")
    ids = _ids(path, rows, "id")
    return [
        {
            "id": id_,
            "subject": _text(path, i, r["subject"], "subject"),
            "question": _text(path, i, r["question"], "question"),
            "choices": _choices(path, i, r),
            "answer": _answer(path, i, r["answer"]),
        }
        for i, (r, id_) in enumerate(zip(rows, ids))
    ]


def load_items(kind: str, path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read an evaluation data file of ``kind`` ("mmlu", "refusal", "over-refusal"); see the module doc."""
    if kind not in KINDS:
        raise InputError(f"unknown evaluation kind {kind!r}; choose one of {', '.join(KINDS)}")
    path = Path(path)
    rows = read_rows(path)
    if not rows:
        raise InputError(f"{path}: empty data file (no rows)")
    if kind == "mmlu":
        return mmlu_items(path, rows)

    if kind == "refusal":
        if "goal" in rows[0]:  # AdvBench harmful_behaviors.csv
            column, id_column = "goal", "id"
        elif "Behavior" in rows[0]:  # HarmBench behaviors CSV
            column, id_column = "Behavior", "BehaviorID"
        elif "prompt" in rows[0]:
            column, id_column = "prompt", "id"
        else:
            raise InputError(f"{path}: missing column goal (AdvBench), Behavior (HarmBench) or prompt for harmful prompts (found: {', '.join(sorted(rows[0]))})")
        ids = _ids(path, rows, id_column)
        items = []
        for i, (r, id_) in enumerate(zip(rows, ids)):
            prompt = _text(path, i, r[column], column)
            context = r.get("ContextString") if column == "Behavior" else None
            if isinstance(context, str) and context.strip():
                prompt = f"{context}\n\n---\n\n{prompt}"  # HarmBench's contextual-behaviour prompt
            items.append({"id": id_, "prompt": prompt})
        return items

    # over-refusal
    _need(path, rows, ("prompt",), "over-refusal prompts")
    ids = _ids(path, rows, "id")
    items = []
    for i, (r, id_) in enumerate(zip(rows, ids)):
        if "label" in r:
            label = str(r["label"]).strip().lower()
            if label not in ("safe", "unsafe"):
                raise InputError(f"{path}: row {i}: label {r['label']!r} is not safe or unsafe")
            if label != "safe":
                continue
        item = {"id": id_, "prompt": _text(path, i, r["prompt"], "prompt")}
        if "type" in r:
            item["type"] = r["type"]
        items.append(item)
    if not items:
        raise InputError(f"{path}: no rows labelled safe; over-refusal is measured on benign prompts")
    return items
