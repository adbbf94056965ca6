"""Prompt formats shared by training (sstmerge.train) and evaluation (sstmerge.eval).

MMLU follows lm-evaluation-harness's ``mmlu`` task (lm_eval/tasks/mmlu/default): the description
"The following are multiple choice questions (with answers) about {subject}.\\n\\n", then each few-shot
example (the first k of the dev split) as ``doc_to_text + " " + letter + "\\n\\n"``, then the query's
``doc_to_text``:

    {question.strip()}\\nA. {choices[0]}\\nB. {choices[1]}\\nC. {choices[2]}\\nD. {choices[3]}\\nAnswer:

The answer is scored as the continuation " A" / " B" / " C" / " D" (target delimiter " ").
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

LETTERS = ("A", "B", "C", "D")
MMLU_CONTINUATIONS = tuple(" " + letter for letter in LETTERS)


def mmlu_description(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def mmlu_doc_to_text(item: Mapping) -> str:
    choices: Sequence[str] = item["choices"]
    if len(choices) != 4:
        raise ValueError(f"an MMLU item needs 4 choices, got {len(choices)}")
    lines = [str(item["question"]).strip()]
    lines += [f"{letter}. {choice}" for letter, choice in zip(LETTERS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def mmlu_prompt(item: Mapping, shots: Iterable[Mapping] = ()) -> str:
    """The context string lm-evaluation-harness builds for ``item`` (k-shot when ``shots`` given)."""
    text = mmlu_description(item["subject"])
    for shot in shots:
        text += mmlu_doc_to_text(shot) + MMLU_CONTINUATIONS[int(shot["answer"])] + "\n\n"
    return text + mmlu_doc_to_text(item)
