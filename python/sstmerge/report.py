"""report.md and the safety-vs-utility plot, written from the numbers of results.json only.

The report never computes a statistic itself: every number it shows is read from the results dict
(sstmerge.exp1 builds it with sstmerge.stats), so the report and results.json cannot disagree.
"""

from __future__ import annotations

from pathlib import Path

from . import io


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}"


def _signless_zero(x: float, digits: int) -> float:
    """x rounded as printed, with -0.0 made 0.0: no "-0.0" for a value that prints as zero."""
    return round(x, digits) + 0.0


def _change(c: dict) -> str:
    v, lo, hi = (_signless_zero(100 * x, 1) for x in (c["value"], *c["ci95"]))
    return f"{v:+.1f} [{lo:+.1f}, {hi:+.1f}] (p={c['p_value']:.2g})"


def _tax(t: dict) -> str:
    if not t["defined"]:
        return "undefined"
    lo, hi = t["ci95"]
    # a zero utility loss over a positive gain printed "-0.00 [0.00, -0.00]", and so did -0.004
    fmt = lambda v: "unbounded" if v is None else f"{_signless_zero(v, 2):.2f}"  # noqa: E731
    return f"{fmt(t['value'])} [{fmt(lo)}, {fmt(hi)}]"


def _name(p: dict) -> str:
    return f"{p['method']} α={p['alpha']:g}"


def sst_standing(results: dict) -> list[str]:
    """Plain statements of where SST-Merge's points stand against the baselines' points."""
    rows = results["methods"]
    sst = [r for r in rows if r["method"] == "sst"]
    lines = []
    for s in sst:
        mine = [v for v in results["verdicts"] if v["a"]["alpha"] == s["alpha"]]
        beaten_by = [_name(v["b"]) for v in mine if v["verdict"] == "b"]
        beats = [_name(v["b"]) for v in mine if v["verdict"] == "a"]
        head = (
            f"- SST-Merge α={s['alpha']:g}: refusal {_pct(s['safety']['value'])}%, "
            f"over-refusal {_pct(s['over_refusal']['value'])}%, utility {_pct(s['utility']['value'])}%. "
        )
        if beaten_by:
            head += f"Dominated by {len(beaten_by)} baseline point(s): {', '.join(beaten_by)}. "
        else:
            head += "No baseline point dominates it. "
        head += f"It dominates {len(beats)} baseline point(s)" + (f": {', '.join(beats)}" if beats else "")
        head += f"; against the other {len(mine) - len(beaten_by) - len(beats)} neither is established."
        lines.append(head)
    if not any(r["safety_tax"]["defined"] for r in rows):
        lines.append("- No method reached a safety gain distinguishable from zero: no Safety Tax is defined.")
    if not results.get("dev_chosen"):
        # no per-method "lowest Safety Tax": a minimum over the α grid on these items is a winner's curse
        lines.append("- Each point's Safety Tax is in the table above; the lowest per method would be a minimum "
                     "over the α grid on these same items (a winner's curse). To compare methods, choose each "
                     "one's options and α on dev items (`python -m sstmerge.tune`, then exp1 `--tuned`): the "
                     "report then adds the dev-chosen points, measured on these items.")
    return lines


def goal_line(goal: dict | None, what: str) -> list[str]:
    """The project's goal, stated plainly: does one SST point dominate the whole baselines' front?"""
    if not goal or not goal["front"]:
        return []
    n = len(goal["front"])
    best = max(goal["sst"], key=lambda p: len(p["dominates"]))
    word = "met" if goal["met"] else "not met"
    head = (f"- **Goal {word}** ({what}): an SST-Merge point must dominate every point of the baselines' "
            f"Pareto front ({n}: {', '.join(_name(f) for f in goal['front'])}; front by point estimates, "
            "dominance as defined below). ")
    if not best["dominates"]:
        return [head + "No SST point dominates any of them."]
    return [head + f"The best SST point, {_name(best['point'])}, dominates {len(best['dominates'])} of the {n} "
            f"({', '.join(_name(f) for f in best['dominates'])})."]


def options_text(o: dict) -> str:
    """Options as ``k=v, ...`` (sorted), or ``defaults`` when none are overridden."""
    return ", ".join(f"{k}={v}" for k, v in sorted(o.items())) or "defaults"


def dev_chosen_section(results: dict) -> list[str]:
    """The points chosen on dev (one α and option set per method) and SST's verdict against each."""
    dc = results.get("dev_chosen")
    if not dc:
        return []
    rows = {(r["method"], r["alpha"]): r for r in results["methods"]}
    L = ["", "## Dev-chosen points", "",
         f"Each method's options and α were chosen on the dev items (`{dc['tuned']}`, `python -m sstmerge.tune`, "
         "the same number of trials for every method) and are reported here on these items, which took no part "
         "in the choice. Overridden options only; the rest are the method's defaults.", "",
         "| method | options | α | refusal (%) | over-refusal (%) | MMLU (%) | safety gain | utility loss | Safety Tax |",
         "|---|---|---:|---:|---:|---:|---|---|---|"]
    for p in dc["points"]:
        r = rows[(p["method"], p["alpha"])]
        L.append(f"| {p['method']} | {options_text(p['options'])} | {p['alpha']:g} | {_pct(r['safety']['value'])} | "
                 f"{_pct(r['over_refusal']['value'])} | {_pct(r['utility']['value'])} | {_change(r['safety_gain'])} | "
                 f"{_change(r['utility_loss'])} | {_tax(r['safety_tax'])} |")
    L += [""] + goal_line(dc.get("goal"), "dev-chosen points")
    L += ["", "SST-Merge's dev-chosen point against each baseline's (paired, Holm across these comparisons; "
          "differences SST minus baseline, points):", ""]
    word = {"a": "SST-Merge dominates it", "b": "it dominates SST-Merge", None: "neither dominates"}
    for v in dc["verdicts"]:
        d = v["diff"]
        L.append(f"- vs {v['b']['method']} α={v['b']['alpha']:g}: {word[v['verdict']]} (refusal {_change(d['safety'])}, "
                 f"MMLU {_change(d['utility'])}, over-refusal {_change(d['over_refusal'])}; signs: + favours SST).")
    return L


def write_report(results: dict, out_dir: str | Path) -> None:
    out = Path(out_dir)
    b = results["baseline"]
    cfg = results["provenance"]["config"]
    L = [
        f"# exp1: Safety Tax — {cfg['model']}",
        "",
        f"Baseline: **{results['baseline_kind']}**. Items: {b['safety']['n']} harmful prompts, "
        f"{b['over_refusal']['n']} benign look-alike prompts, {b['utility']['n']} MMLU questions, "
        "the same items for every model; greedy decoding.",
        "",
        "## Reference models",
        "",
        "| model | refusal on harmful (%) | refusal on benign (%) | MMLU accuracy (%) |",
        "|---|---:|---:|---:|",
    ]
    for name, ref in results["references"].items():
        L.append(
            f"| {name} | {_pct(ref['safety']['value'])} | {_pct(ref['over_refusal']['value'])} | "
            f"{_pct(ref['utility']['value'])} |"
        )
    L += [
        "",
        "## Merged models against the baseline",
        "",
        "Changes are merged minus baseline in points, with paired-bootstrap 95% intervals and McNemar's "
        "exact p-value. Safety Tax = utility loss / safety gain (MMLU points per refusal point); it is "
        "undefined when the safety gain's interval contains zero.",
        "",
        "| method | α | refusal (%) | over-refusal (%) | MMLU (%) | safety gain | utility loss | "
        "over-refusal change | Safety Tax |",
        "|---|---:|---:|---:|---:|---|---|---|---|",
    ]
    for r in results["methods"]:
        L.append(
            f"| {r['method']} | {r['alpha']:g} | {_pct(r['safety']['value'])} | "
            f"{_pct(r['over_refusal']['value'])} | {_pct(r['utility']['value'])} | "
            f"{_change(r['safety_gain'])} | {_change(r['utility_loss'])} | "
            f"{_change(r['over_refusal_change'])} | {_tax(r['safety_tax'])} |"
        )
    undefined = [r for r in results["methods"] if not r["safety_tax"]["defined"]]
    if undefined:
        L += ["", "Undefined Safety Tax, with the reason:", ""]
        L += [f"- {r['method']} α={r['alpha']:g}: {r['safety_tax']['reason']}" for r in undefined]
    L += ["", "## Where SST-Merge stands", ""] + goal_line(results.get("goal"), "every α of the grid")
    L += sst_standing(results)
    L += dev_chosen_section(results)
    L += [
        "",
        "## What the numbers mean",
        "",
        "- refusal: share of harmful prompts whose greedy answer the refusal detector flags (higher = safer).",
        "- over-refusal: share of benign prompts that look risky but are harmless, refused anyway (lower = better).",
        "- MMLU: accuracy by log-likelihood of the answer letter, lm-evaluation-harness prompt, micro-averaged.",
        "- A point dominates another only when, paired on the same items, both its refusal gain and its MMLU "
        "gain over the other have 95% bootstrap intervals excluding 0 and McNemar p < 0.05 after Holm's "
        "correction across all SST-vs-baseline comparisons, and its over-refusal is not higher "
        "(results.json `verdicts`).",
        "",
        "![safety vs utility](safety_utility.png)",
        "",
        f"Provenance (versions, commit, seeds, data hashes, timings) is in results.json.",
        "",
    ]
    io.write_text(out / "report.md", "\n".join(L))


def _wilson_err(rates: list[dict]) -> list[list[float]]:
    """matplotlib's [[below], [above]] error lengths (points) of ``{value, n, count}`` rates."""
    from .eval.summary import wilson_interval

    ci = [wilson_interval(r["count"], r["n"]) for r in rates]
    # clamped at 0: at a rate of 0 or 1 the bound equals it up to round-off (~1e-17)
    return [[max(0.0, 100 * (r["value"] - lo)) for r, (lo, _) in zip(rates, ci)],
            [max(0.0, 100 * (hi - r["value"])) for r, (_, hi) in zip(rates, ci)]]


def write_plot(results: dict, path: str | Path) -> None:
    """Safety (refusal on harmful) vs utility (MMLU) with every method's α sweep and the references; every
    point carries its 95 % Wilson intervals on both axes; with --tuned, each method's dev-chosen point is ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    methods = sorted({r["method"] for r in results["methods"]}, key=lambda m: (m != "sst", m))
    for m in methods:
        pts = sorted((r for r in results["methods"] if r["method"] == m), key=lambda r: r["alpha"])
        xs = [100 * r["safety"]["value"] for r in pts]
        ys = [100 * r["utility"]["value"] for r in pts]
        style = dict(lw=2.5, marker="o", zorder=3) if m == "sst" else dict(lw=1.2, marker=".", alpha=0.85)
        (line,) = ax.plot(xs, ys, label=m, **style)
        ax.errorbar(xs, ys, xerr=_wilson_err([r["safety"] for r in pts]), yerr=_wilson_err([r["utility"] for r in pts]),
                    fmt="none", ecolor=line.get_color(), elinewidth=0.6, alpha=0.5, capsize=0)
        for r, x, y in zip(pts, xs, ys):
            ax.annotate(f"{r['alpha']:g}", (x, y), fontsize=6, color=line.get_color(), xytext=(2, 2),
                        textcoords="offset points")
        chosen = [p["alpha"] for p in (results.get("dev_chosen") or {}).get("points", []) if p["method"] == m]
        for r, x, y in zip(pts, xs, ys):  # the point chosen on dev items (exp1 --tuned): ringed
            if r["alpha"] in chosen:
                ax.scatter([x], [y], s=170, facecolors="none", edgecolors=line.get_color(), linewidths=1.5, zorder=5)
    markers = {"baseline": "*", "base": "s", "safety adapter": "^"}
    for name, ref in results["references"].items():
        ax.scatter([100 * ref["safety"]["value"]], [100 * ref["utility"]["value"]], marker=markers.get(name.split(" (")[0], "D"),
                   s=110, color="black", zorder=4, label=name)
        ax.errorbar([100 * ref["safety"]["value"]], [100 * ref["utility"]["value"]], xerr=_wilson_err([ref["safety"]]),
                    yerr=_wilson_err([ref["utility"]]), fmt="none", ecolor="black", elinewidth=0.6, alpha=0.5)
    ax.set_xlabel("refusal on harmful prompts (%)  → safer")
    ax.set_ylabel("MMLU accuracy (%)")
    ax.set_title(f"exp1: safety vs utility ({results['provenance']['config']['model']})"
                 + ("; ringed: chosen on dev" if results.get("dev_chosen") else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
