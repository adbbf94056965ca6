"""How well do SmolLM2-135M-Instruct's own hidden states tell harmful requests from benign look-alikes?

    python bench/smol_probe.py [--train-templates 10]

Logistic-regression probes (standardised features, C = 0.1, balanced classes) on the base model's hidden
states, per layer: the last prompt token's state, and the mean over the prompt's tokens (the chat
template applied, generation prompt added). Trained on the world's training requests (harmful vs benign,
``smol.Config()``'s data), scored on the dev and test requests (other tasks, other templates): the share
of harmful requests called harmful and of benign ones called benign. A rough measure of how far the
base's representation carries the distinction to new tasks and phrasings; a LoRA adapter can compute
more than a linear probe, but learns from the same few tasks. Needs scikit-learn.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def features(model, tok, prompts: list[str], batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """[layers + 1, n, d] hidden states at the last prompt token, and averaged over the prompt's tokens."""
    last, mean = [], []
    tok.padding_side = "left"
    for i in range(0, len(prompts), batch):
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            h = torch.stack(model(**enc, output_hidden_states=True).hidden_states)  # [L+1, B, T, d]
        w = enc["attention_mask"].float()[None, :, :, None]
        last.append(h[:, :, -1].numpy())  # left padding: the last position is every prompt's last token
        mean.append(((h * w).sum(2) / w.sum(2)).numpy())
    return np.concatenate(last, 1), np.concatenate(mean, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-templates", type=int, help="use only the first N train templates")
    p.add_argument("--every", type=int, default=3, help="probe every k-th layer")
    a = p.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from sstmerge.models import load_model
    from sstmerge.worlds import smol, smol_data as D

    if a.train_templates:
        D.REQUEST_TEMPLATES["train"] = tuple(D.REQUEST_TEMPLATES["train"][:a.train_templates])
    data = smol.generate_data(smol.Config())
    model, tok = load_model(smol.base_model_dir(), device="cpu")
    model.eval()
    sets = {}
    for split in ("train", "dev", "test"):
        harmful = [r["prompt"] for r in data[f"harmful_{split}"]]
        benign = [r["prompt"] for r in data[f"benign_{split}"]]
        sets[split] = (*features(model, tok, harmful + benign), np.array([1] * len(harmful) + [0] * len(benign)))
    print("| features | layer | dev harmful | dev benign | test harmful | test benign |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, j in (("last token", 0), ("mean", 1)):
        for layer in range(2, sets["train"][0].shape[0], a.every):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced"))
            clf.fit(sets["train"][j][layer], sets["train"][2])
            cells = []
            for split in ("dev", "test"):
                pred, y = clf.predict(sets[split][j][layer]), sets[split][2]
                cells += [f"{100 * pred[y == 1].mean():.0f}", f"{100 * (1 - pred[y == 0]).mean():.0f}"]
            print(f"| {kind} | {layer} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
