"""The demo's comparison: every cell's evaluation read back, per-skill accuracy, the table and the verdict.

It reads only files the cells' pipelines wrote (`cells/<cell>/stat/eval*/demo_test.jsonl`, their training sets and
GRPO metrics) and writes `results.json` and `results.txt` (report.html draws the charts).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stat_jax.data import arith_task as task
from stat_jax.data.records import MathProblem, SFTExample, bare_skill_name
from stat_jax.report.verdict import format_table, verdict
from stat_jax.stat import io

def per_skill_accuracy(records: Sequence[dict[str, Any]], problems: Sequence[MathProblem]) -> dict[str, Any]:
    """Overall greedy accuracy, accuracy on the test questions that exercise each skill, and each question's
    correctness in `problems` order ("correct": a string of 0/1, for paired intervals)."""
    by_id = {p.id: p for p in problems}
    # a benchmark's record ids are "<benchmark>/<row id>"; the split's are the row ids
    correct = {r["id"].split("/", 1)[-1]: bool(r["greedy"]["correct"]) for r in records}
    missing = [p.id for p in problems if p.id not in correct]
    if missing:
        raise ValueError(f"evaluation records lack {len(missing)} test questions (first: {missing[0]})")
    out = {"overall": sum(correct.values()) / len(correct), "per_skill": {},
           "correct": "".join("1" if correct[p.id] else "0" for p in problems)}
    for skill in task.SKILL_NAMES:
        ids = [pid for pid in correct if skill in (by_id[pid].skills or [])]
        out["per_skill"][skill] = sum(correct[i] for i in ids) / len(ids) if ids else None
    return out


def flagged_skills(profile: dict[str, Any], min_share: float) -> list[str]:
    """The skills (task names) the Missing-Skill-Profile blames for at least `min_share` of all mentions."""
    return [bare_skill_name(r["skill"]) for r in profile["skills"] if r["frequency"] >= min_share]


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


def example_question(e: SFTExample) -> str:
    """The problem text of a training example (its last user turn, without the instruction)."""
    if e.messages:
        return e.messages[-1]["content"].split("\n\n")[0]
    return e.prompt or ""


def skill_shares(examples: Sequence[SFTExample]) -> dict[str, float]:
    """Per skill: the share of `examples` whose question exercises it (read back from the question text)."""
    counts = dict.fromkeys(task.SKILL_NAMES, 0)
    for e in examples:
        for skill in set(task.problem_skills(example_question(e))):
            counts[skill] += 1
    return {k: v / max(1, len(examples)) for k, v in counts.items()}


def flagged_share(shares: dict[str, float], flagged: Sequence[str]) -> float:
    """The mean, over the flagged skills, of the share of examples that exercise each one."""
    return statistics.fmean(shares[s] for s in flagged) if flagged else 0.0


def _relative(record: dict[str, Any], root: Path) -> dict[str, Any]:
    """The record's paths under `root` made relative to it: results.json does not depend on where the workdir is."""
    out = {}
    for k, v in record.items():
        if isinstance(v, str) and Path(v).is_absolute() and Path(v).is_relative_to(root):
            v = Path(v).relative_to(root).as_posix()
        out[k] = v
    return out


def _cell_result(root: Path, cell: str, stage: str, test: Sequence[MathProblem]) -> dict[str, Any]:
    return per_skill_accuracy(io.read_jsonl(root / "cells" / cell / "stat" / stage / "demo_test.jsonl"), test)


def _curve(cell: Path) -> list[dict[str, Any]]:
    """A cell's GRPO reward curve: per step the reward mean and std and the share of groups without signal."""
    keys = ("step", "reward_mean", "reward_std", "zero_std_groups")
    return [{k: r[k] for k in keys if k in r} for r in io.read_jsonl(cell / "grpo/metrics.jsonl") if "reward_mean" in r]


def set_stats(run_dir: Path, tokenizer) -> dict[str, Any]:
    """The training set a cell's SFT drew at the token budget: examples, tokens, skill shares."""
    from stat_jax.data.sft_data import example_tokens, load_sft_examples

    chosen = load_sft_examples([run_dir / "sft/train.jsonl"])
    return {"examples": len(chosen), "unique_questions": len({example_question(e) for e in chosen}),
            "tokens": sum(example_tokens(tokenizer, e) for e in chosen), "skill_shares": skill_shares(chosen)}


def rows_of(runs: dict[str, list[dict[str, Any]]], flagged: Sequence[str]) -> dict[str, Any]:
    """Per row: overall, flagged-skill and per-skill accuracy as mean, std and the per-seed values."""
    rows = {}
    for name, results in runs.items():
        per_skill = {s: _spread([r["per_skill"][s] for r in results]) for s in task.SKILL_NAMES
                     if all(r["per_skill"][s] is not None for r in results)}
        flagged_acc = [statistics.fmean(r["per_skill"][s] for s in flagged) for r in results] if flagged else []
        rows[name] = {"overall": _spread([r["overall"] for r in results]), "per_skill": per_skill,
                      "flagged": _spread(flagged_acc) if flagged_acc else None, "runs": len(results),
                      "correct": [r["correct"] for r in results]}
    return rows


def write_results(config, root: Path, base: dict[str, Any], cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """results.json and results.txt, from the cells' own files; `cells`: {cell: {command}} (their accuracy added)."""
    from stat_jax.models.student import load_tokenizer

    d = config.demo
    test = io.read_problems(root / f"data/{d.eval_split}.jsonl")
    profile = io.read_json(root / "stat/profile/profile.json")
    flagged = flagged_skills(profile, d.flag_min_share)
    tokenizer = load_tokenizer(config, Path(io.read_json(root / "student/base.json")["model"]))
    runs: dict[str, list[dict[str, Any]]] = {"base": [base]}
    sets, curves, round2 = {}, {}, {}
    for m in d.methods:
        for s in d.seeds:
            cell = root / "cells" / f"{m}-seed{s}" / "stat"
            runs.setdefault(m, []).append(_cell_result(root, f"{m}-seed{s}", "eval", test))
            cells[f"{m}-seed{s}"]["accuracy"] = runs[m][-1]["overall"]
            sets[f"seed{s}/{m}"] = set_stats(cell, tokenizer)
            if (cell / "eval_grpo/demo_test.jsonl").exists():
                runs.setdefault(f"{m}+grpo", []).append(_cell_result(root, f"{m}-seed{s}", "eval_grpo", test))
                curves[f"seed{s}/{m}"] = _curve(cell)
    for m in d.targeted_grpo_methods:
        for s in d.seeds:
            if (root / "cells" / f"{m}+targeted-seed{s}").is_dir():
                name = f"{m}+targeted-seed{s}"
                runs.setdefault(f"{m}+grpo_targeted", []).append(_cell_result(root, name, "eval_grpo", test))
                cells[name]["accuracy"] = runs[f"{m}+grpo_targeted"][-1]["overall"]
                curves[f"seed{s}/{m}+targeted"] = _curve(root / "cells" / name / "stat")
    for m in d.round2_methods:
        for s in d.seeds:
            name = f"{m}+round2-seed{s}"
            cell = root / "cells" / name / "stat"
            runs.setdefault(f"{m}+round2", []).append(_cell_result(root, name, "eval", test))
            cells[name]["accuracy"] = runs[f"{m}+round2"][-1]["overall"]
            round2[f"seed{s}/{m}"] = {
                "flagged_skills": flagged_skills(io.read_json(cell / "profile/profile.json"), d.flag_min_share),
                "round": _relative(io.read_json(cell / "round.json"), root), "set": set_stats(cell, tokenizer)}
    results = {
        "split": d.eval_split, "questions": len(test), "seeds": list(d.seeds), "token_budget": config.stat.token_budget,
        "skills": list(task.SKILL_NAMES),
        "flagged_skills": flagged, "rare_skills": list(d.rare_skills), "profile": profile,
        "rows": rows_of(runs, flagged), "sets": sets,
        # share of each method's training examples that exercise a flagged skill (mean over seeds)
        "flagged_share": {m: statistics.fmean(flagged_share(sets[f"seed{s}/{m}"]["skill_shares"], flagged)
                                              for s in d.seeds) for m in d.methods},
        "sel_stats": io.read_json(root / "stat/sel/stats.json") if (root / "stat/sel/stats.json").exists() else None,
        "syn_stats": io.read_json(root / "stat/syn/stats.json") if (root / "stat/syn/stats.json").exists() else None,
        "grpo_curves": curves, "cells": cells, "hard_rule": io.read_json(root / "stat/hard/manifest.json")["stats"],
    }
    if round2:
        results["round2"] = round2
    results["verdict"] = verdict(results)
    io.write_json(root / "results.json", results)
    (root / "results.txt").write_text(format_table(results) + "\n")
    return results
