"""The comparison of methods as it is printed and shown: row names, the results table, the verdict in words.

Reads the rows `stat_jax.demo.compare` writes to results.json (per row: overall, flagged and per-skill accuracy,
mean and std over seeds, the per-seed values); shared by `stat-jax demo` and `stat-jax report`.
"""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np

METHOD_LABELS = {"base": "base", "sft": "SFT (original mix)", "math_hard": "MATH-Hard", "embed_sel": "Embed-Sel",
                 "stat_sel": "STAT-Sel", "stat_syn": "STAT-Syn"}


def paired_interval(a_runs: list[str], b_runs: list[str], *, draws: int = 2000, seed: int = 0
                    ) -> tuple[float, float, float]:
    """(mean, low, high) of accuracy a - b in points, with the 95% interval of a paired bootstrap: each draw
    resamples the test questions (the same ones for both: a and b were scored on the same questions) and the
    seeds (seed i of a with seed i of b; a row of one run, the base student, pairs with every seed).

    a_runs, b_runs: per run (seed), the questions' greedy correctness as a string of 0/1 in test-split order.
    """
    a = np.array([[c == "1" for c in run] for run in a_runs], np.int8)
    b = np.array([[c == "1" for c in run] for run in b_runs], np.int8)
    if a.shape[1] != b.shape[1] or (len(a) != len(b) and 1 not in (len(a), len(b))):
        raise ValueError(f"paired_interval: runs of {a.shape} and {b.shape} questions/seeds do not pair")
    d = a - b  # [seeds, questions]
    rng = np.random.default_rng(seed)
    questions = rng.integers(0, d.shape[1], (draws, d.shape[1]))
    seeds = rng.integers(0, d.shape[0], (draws, d.shape[0]))
    per_seed = d[:, questions].sum(axis=2, dtype=np.int32).T / d.shape[1]  # [draws, seeds]
    boot = np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)
    low, high = np.percentile(boot, [2.5, 97.5])
    return 100 * float(d.mean()), 100 * float(low), 100 * float(high)


def _interval(rows: dict[str, Any], a: str, b: str) -> str:
    """" [95% CI lo, hi]" for row a - row b when both rows kept their per-question results, else ""."""
    if "correct" not in rows[a] or "correct" not in rows[b]:
        return ""
    _, low, high = paired_interval(rows[a]["correct"], rows[b]["correct"])
    return f" [95% CI {low:+.1f}, {high:+.1f}]"


def _gap(rows: dict[str, Any], a: str, b: str, key: str) -> tuple[float, float]:
    """Mean difference a - b in points and its spread (std of the per-seed differences, seeds paired)."""
    va, vb = rows[a][key]["values"], rows[b][key]["values"]
    diffs = [100 * (x - y) for x, y in zip(va, vb)] if len(va) == len(vb) else [100 * (statistics.fmean(va) -
                                                                                    statistics.fmean(vb))]
    return statistics.fmean(diffs), (statistics.stdev(diffs) if len(diffs) > 1 else 0.0)


def verdict(report: dict[str, Any]) -> list[str]:
    """One line per comparison the demo exists for, in words and numbers (seeds paired): the mean difference,
    its 95% paired-bootstrap interval over questions and seeds (rows with per-question results), the seed spread."""
    rows, n = report["rows"], len(report["seeds"])
    lines = []
    if "sft" in rows and "base" in rows:
        gap = 100 * (rows["sft"]["overall"]["mean"] - rows["base"]["overall"]["mean"])
        lines.append(f"SFT on more of the original mix moves the base student by {gap:+.1f}"
                     f"{_interval(rows, 'sft', 'base')} points overall "
                     f"({'saturated' if abs(gap) <= 2 else 'not saturated'})")
    for m in ("math_hard", "embed_sel", "stat_sel", "stat_syn"):
        if m in rows and "sft" in rows and rows[m]["flagged"] and rows["sft"]["flagged"]:
            mean, std = _gap(rows, m, "sft", "overall")
            flagged, _ = _gap(rows, m, "sft", "flagged")
            lines.append(f"{METHOD_LABELS[m]} - SFT = {mean:+.1f}{_interval(rows, m, 'sft')} ± {std:.1f} overall, "
                         f"{flagged:+.1f} on flagged skills over {n} seeds")
    for name in rows:
        if name.endswith("+grpo") and name.split("+")[0] in rows:
            base = name.split("+")[0]
            mean, std = _gap(rows, name, base, "overall")
            lines.append(f"GRPO on top of {METHOD_LABELS[base]}: {mean:+.1f}{_interval(rows, name, base)} ± {std:.1f} "
                         f"overall over {n} seeds")
    for name in rows:
        balanced = name.replace("+grpo_targeted", "+grpo")
        if (name.endswith("+grpo_targeted") and balanced in rows and rows[name]["flagged"]
                and rows[balanced]["flagged"]):
            mean, std = _gap(rows, name, balanced, "overall")
            flagged, _ = _gap(rows, name, balanced, "flagged")
            lines.append(f"{row_label(name)} - {row_label(balanced)} = {flagged:+.1f} on flagged skills, "
                         f"{mean:+.1f}{_interval(rows, name, balanced)} ± {std:.1f} overall over {n} seeds")
    for name in rows:
        if name.endswith("+round2") and name.split("+")[0] in rows:
            base = name.split("+")[0]
            mean, std = _gap(rows, name, base, "overall")
            flagged = (f", {_gap(rows, name, base, 'flagged')[0]:+.1f} on round 1's flagged skills"
                       if rows[name]["flagged"] and rows[base]["flagged"] else "")
            lines.append(f"{METHOD_LABELS[base]} round 2 (profiled again on a new validation split, trained further "
                         f"at the same budget) - round 1 = {mean:+.1f}{_interval(rows, name, base)} ± {std:.1f} "
                         f"overall{flagged} over {n} seeds")
    return lines


def row_label(name: str) -> str:
    """The table's name for a row: a method, or a method +GRPO / round 2."""
    if name in METHOD_LABELS:
        return METHOD_LABELS[name]
    method, suffix = name.split("+", 1)
    suffixes = {"grpo": " +GRPO", "round2": " round 2", "grpo_targeted": " +GRPO (skill-targeted prompts)"}
    return METHOD_LABELS.get(method, method) + suffixes.get(suffix, f" +{suffix}")


def format_table(report: dict[str, Any]) -> str:
    """Accuracy (%) per method: overall, on the flagged skills, and per skill, as mean±std over seeds."""
    rows = report["rows"]
    skills = list(report.get("skills") or next(iter(rows.values()))["per_skill"])
    flagged = set(report["flagged_skills"])
    header = ["method", "overall", "flagged"] + [s[:11] + ("*" if s in flagged else "") for s in skills]

    def cell(v):
        if v is None:
            return "-"
        return f"{100 * v['mean']:.1f}" + (f"±{100 * v['std']:.1f}" if v["values"] and len(v["values"]) > 1 else "")

    lines = []
    for name, r in rows.items():
        label = row_label(name)
        lines.append([label, cell(r["overall"]), cell(r["flagged"])] + [cell(r["per_skill"].get(s)) for s in skills])
    widths = [max(len(str(x)) for x in col) + 2 for col in zip(header, *lines)]
    fmt = lambda row: "".join(str(x).rjust(w) if i else str(x).ljust(w) for i, (x, w) in enumerate(zip(row, widths)))
    questions = f" ({report['questions']} questions)" if report.get("questions") else ""
    notes = (f"accuracy (%) on the {report.get('split', 'test')} split{questions}; mean±std over seeds "
             f"{report['seeds']}; "
             f"equal budget of {report['token_budget']} training tokens per method; * = flagged by the "
             f"Missing-Skill-Profile")
    rule = report.get("hard_rule")
    if rule:  # which rule chose the profiled questions, and whether it read the reference answers
        notes += (f"\nhard questions: {rule.get('scorer')} ({rule.get('rule')}; "
                  f"{'uses the reference answers (labels)' if rule.get('uses_reference_labels') else 'label-free'})")
    return "\n".join([notes, fmt(header)] + [fmt(r) for r in lines] + [""] + list(report.get("verdict", [])))
