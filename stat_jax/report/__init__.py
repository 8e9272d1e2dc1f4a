"""`stat-jax report RUN_DIR [RUN_DIR ...]`: one self-contained HTML page of a STAT run (or of the demo).

The page (`report.html` in the first directory) shows, for each section whose stage ran: the verdict, per-skill
accuracy before and after, the Missing-Skill-Profile, the training sets' skill shares against the original mix,
every hard question with the student's answer and the teacher's diagnosis (filterable by skill), GRPO curves,
the teacher ledger against its plan, and the resolved config with the command that reproduces the run. Several
directories (round 1 and round 2, two students) are shown side by side. Charts are inline SVG drawn by
matplotlib and the page is a jinja2 template: nothing is loaded from the network.
"""

from __future__ import annotations

import argparse
import io as _io
import json
import logging
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stat_jax.data.records import bare_skill_name
from stat_jax.errors import RunStateMissingError
from stat_jax.report.verdict import row_label

log = logging.getLogger(__name__)

TEMPLATE = Path(__file__).with_name("report.html.j2")
REPORT_FILE = "report.html"


# ----- reading a run directory ------------------------------------------------------------------------------
def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (ValueError, OSError) as e:
        log.warning("report: %s is unreadable (%s); its section is left out", path, e)
        return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in filter(str.strip, path.read_text(encoding="utf-8").splitlines()):
        try:
            rows.append(json.loads(line))
        except ValueError:
            log.warning("report: %s has a line that is not JSON; it is skipped", path)
    return rows


def stat_dir(run: Path) -> Path:
    """The STAT stages' directory of a run: `<workdir>/stat` when it exists, else the directory itself."""
    return run / "stat" if (run / "stat").is_dir() else run


# ----- the sections ------------------------------------------------------------------------------------------
def verdict_section(run: Path) -> dict[str, Any] | None:
    """The demo's rows and verdict lines, or a run's eval figures (headline per benchmark, before/after GRPO)."""
    results = _json(run / "results.json")
    if results:
        rows = [{"name": row_label(name), "overall": r["overall"], "flagged": r.get("flagged"), "runs": r["runs"]}
                for name, r in results["rows"].items()]
        return {"lines": results.get("verdict", []), "rows": rows, "split": results.get("split"),
                "seeds": results.get("seeds", [])}
    evals = {}
    for stage in ("eval", "eval_grpo"):
        summary = _json(stat_dir(run) / stage / "summary.json")
        if summary:
            evals[stage] = {b: {"headline": r.get("headline", r.get("pass@1")), "n": r.get("n"),
                                "metric": (r.get("grading") or {}).get("headline", "pass@1")}
                            for b, r in summary.get("benchmarks", {}).items()}
    return {"evals": evals} if evals else None


def per_skill_section(run: Path) -> dict[str, Any] | None:
    results = _json(run / "results.json")
    if not results:
        return None
    skills = sorted({s for r in results["rows"].values() for s in r.get("per_skill", {})})
    rows = [{"name": row_label(name), "cells": [r["per_skill"].get(s, {}).get("mean") for s in skills]}
            for name, r in results["rows"].items()]
    return {"skills": skills, "flagged": results.get("flagged_skills", []), "rows": rows,
            "chart": _bars_svg([r["name"] for r in rows], skills, [[c for c in r["cells"]] for r in rows],
                               "Per-skill accuracy before (base) and after each method", "skill", "accuracy",
                               marked=set(results.get("flagged_skills", [])))}


def profile_section(run: Path) -> dict[str, Any] | None:
    profile = _json(stat_dir(run) / "profile" / "profile.json")
    if not profile or not profile.get("skills"):
        return None
    skills = profile["skills"]
    return {"skills": skills, "total": sum(r["count"] for r in skills),
            "chart": _hbar_svg([r["skill"] for r in skills], [r["count"] for r in skills],
                               "Missing-Skill-Profile: how often the teacher named each skill", "mentions")}


def _set_shares(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per skill: the share of a training set's examples whose question is labelled with it (meta.skill[s])."""
    counts: Counter[str] = Counter()
    for r in rows:
        meta = r.get("meta") or {}
        skills = meta.get("skills") or ([meta["skill"]] if meta.get("skill") else [])
        counts.update({bare_skill_name(s) for s in skills})
    return {k: v / max(1, len(rows)) for k, v in counts.items()}


def shares_section(run: Path) -> dict[str, Any] | None:
    """Each training set's skill shares against the original mix (the demo's sets; a run's STAT sets vs its pool)."""
    results = _json(run / "results.json")
    if results and results.get("sets"):
        by_method: dict[str, list[dict[str, float]]] = {}
        for key, stats in results["sets"].items():
            by_method.setdefault(key.split("/", 1)[1], []).append(stats["skill_shares"])
        sets = {row_label(m): {s: statistics.fmean(x[s] for x in runs) for s in runs[0]}
                for m, runs in by_method.items()}
        reference = row_label("sft")
    else:
        d = stat_dir(run)
        pool = _jsonl(d / "label" / "skill_map.jsonl")
        sets = {"original mix (Skill-Map)": _set_shares([{"meta": {"skills": r.get("skills", [])}} for r in pool])}
        for name, f in (("STAT-Sel", "sel/stat_sel.jsonl"), ("STAT-Syn", "syn/stat_syn.jsonl")):
            rows = _jsonl(d / f)
            if rows:
                sets[name] = _set_shares(rows)
        reference = "original mix (Skill-Map)"
        if len(sets) < 2 or not pool:
            return None
    skills = sorted({s for shares in sets.values() for s in shares})
    names = [reference] + [m for m in sets if m != reference] if reference in sets else list(sets)
    return {"skills": skills, "names": names, "reference": reference,
            "rows": [{"skill": s, "cells": [sets[m].get(s, 0.0) for m in names]} for s in skills]}


def hard_section(run: Path) -> dict[str, Any] | None:
    """Every hard question with the student's answer, the reference, the rule and the teacher's diagnosis."""
    d = stat_dir(run)
    hard = _jsonl(d / "hard" / "hard.jsonl")
    if not hard:
        return None
    diagnoses = {r["id"]: r for r in _jsonl(d / "diagnose" / "diagnoses.jsonl")}
    manifest = _json(d / "hard" / "manifest.json") or {}
    entries = []
    for r in hard:
        dx = diagnoses.get(r["id"], {})
        missing = [bare_skill_name(s) for s in dx.get("missing_skills", [])]
        entries.append({"id": r["id"], "problem": r.get("problem", ""), "response": r.get("response", ""),
                        "reference": r.get("answer", ""), "rule": r.get("rule", ""), "score": r.get("score"),
                        "missing": missing, "reason": dx.get("explanation") or dx.get("none_missing_reason") or "",
                        "diagnosed": bool(dx)})
    skills = sorted({s for e in entries for s in e["missing"]})
    stats = manifest.get("stats", {})
    return {"entries": entries, "skills": skills, "rule": stats.get("rule", ""),
            "uses_labels": stats.get("uses_reference_labels")}


def grpo_section(run: Path) -> dict[str, Any] | None:
    """Per GRPO run: reward (and KL / mismatch, where logged) per step."""
    results = _json(run / "results.json")
    curves: dict[str, list[dict[str, Any]]] = dict(results.get("grpo_curves", {})) if results else {}
    metrics = [r for r in _jsonl(stat_dir(run) / "grpo" / "metrics.jsonl") if "reward_mean" in r]
    if metrics:
        curves["grpo"] = metrics
    if not curves:
        return None
    charts = [_lines_svg({k: [(r["step"], r["reward_mean"]) for r in c] for k, c in curves.items()},
                         "GRPO: mean reward of each step's rollouts", "step", "mean reward")]
    for key, title in (("kl", "KL to the start model"), ("mismatch_mean", "engine/trainer log-prob mismatch")):
        logged = {k: [(r["step"], r[key]) for r in c if key in r] for k, c in curves.items()}
        if any(logged.values()):
            charts.append(_lines_svg({k: v for k, v in logged.items() if v}, f"GRPO: {title}", "step", key))
    return {"runs": sorted(curves), "charts": charts}


def ledger_section(run: Path) -> dict[str, Any] | None:
    summary = _json(stat_dir(run) / "teacher" / "summary.json")
    if not summary:
        return None
    plan = _json(stat_dir(run) / "teacher" / "plan.json")
    return {"summary": summary, "plan": plan}


def config_section(run: Path) -> dict[str, Any] | None:
    config = _json(run / "config.json")
    command = _json(run / "command.json")
    if config is None and command is None:
        return None
    return {"config": json.dumps(config, indent=2, sort_keys=True) if config is not None else None,
            "command": (command or {}).get("command")}


SECTIONS = (("verdict", "Verdict", verdict_section), ("per_skill", "Per-skill accuracy", per_skill_section),
            ("profile", "Missing-Skill-Profile", profile_section),
            ("shares", "Training sets: skill shares", shares_section),
            ("hard", "Hard questions and diagnoses", hard_section), ("grpo", "GRPO", grpo_section),
            ("ledger", "Teacher ledger", ledger_section), ("config", "Config and command", config_section))


def read_run(run: Path) -> dict[str, Any]:
    """Every section a run directory has data for (None for the others)."""
    if not run.is_dir():
        raise RunStateMissingError(f"report: {run} is not a run directory",
                                   hint="pass the workdir of a `stat-jax run` or `stat-jax demo`")
    return {"path": str(run), "name": run.name, **{key: build(run) for key, _, build in SECTIONS}}


def compare_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Several runs side by side: each one's profile shares, per skill."""
    profiles = [{r["skill"]: r["frequency"] for r in (run["profile"] or {}).get("skills", [])} for run in runs]
    if len(runs) < 2 or not any(profiles):
        return None
    skills = sorted({s for p in profiles for s in p})
    return {"names": [r["name"] for r in runs],
            "rows": [{"skill": s, "cells": [p.get(s) for p in profiles]} for s in skills]}


# ----- charts (matplotlib, inline SVG) -------------------------------------------------------------------------
def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = _io.StringIO()
    fig.tight_layout()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog: the SVG sits inside HTML


def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _hbar_svg(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str) -> str:
    fig, ax = _figure(7, 0.35 * len(labels) + 1.2)
    ax.barh(range(len(labels)), values, color="#3b6ea5")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("skill")
    ax.set_title(title)
    return _svg(fig)


def _bars_svg(series: Sequence[str], groups: Sequence[str], values: Sequence[Sequence[float | None]], title: str,
              xlabel: str, ylabel: str, marked: set[str] = frozenset()) -> str:
    fig, ax = _figure(9, 3.8)
    width = 0.8 / max(1, len(series))
    for i, (name, row) in enumerate(zip(series, values)):
        ax.bar([g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))],
               [100 * v if v is not None else 0 for v in row], width, label=name)
    ax.set_xticks(range(len(groups)), [g + ("*" if g in marked else "") for g in groups], rotation=30, ha="right",
                  fontsize=8)
    ax.set_xlabel(xlabel + (" (* = flagged)" if marked else ""))
    ax.set_ylabel(ylabel + " (%)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=min(4, len(series)))
    return _svg(fig)


def _lines_svg(curves: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str) -> str:
    fig, ax = _figure(7, 3.5)
    for name, points in curves.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", ms=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=3)
    return _svg(fig)


# ----- the page ------------------------------------------------------------------------------------------------
def render(runs: Sequence[dict[str, Any]]) -> str:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE.parent), autoescape=True,
                             undefined=jinja2.ChainableUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda v: "–" if v is None else f"{100 * v:.1f}"
    return env.get_template(TEMPLATE.name).render(
        runs=runs, comparison=compare_runs(runs), titles={key: title for key, title, _ in SECTIONS},
        generated=time.strftime("%Y-%m-%d %H:%M:%S"))


def write_report(run_dirs: Sequence[str | Path]) -> Path:
    """Writes report.html into the first run directory and returns its path."""
    runs = [read_run(Path(p)) for p in run_dirs]
    out = Path(run_dirs[0]) / REPORT_FILE
    out.write_text(render(runs), encoding="utf-8")
    return out


def write_report_quietly(run_dir: str | Path) -> Path | None:
    """`stat-jax run` / `demo` end: the report, or a one-line warning (a report never fails the run it shows)."""
    try:
        path = write_report([run_dir])
    except Exception as e:  # noqa: BLE001
        log.warning("report: could not write %s/%s: %s: %s", run_dir, REPORT_FILE, type(e).__name__, e)
        return None
    log.info("report: %s", path)
    return path


def main(argv: Sequence[str]) -> int:
    """`stat-jax report RUN_DIR [RUN_DIR ...]`."""
    p = argparse.ArgumentParser(prog="stat-jax report", description="one self-contained HTML page of STAT runs")
    p.add_argument("run_dirs", nargs="+", help="workdirs of `stat-jax run` / `stat-jax demo` (first: where it goes)")
    args = p.parse_args(list(argv))
    start = time.monotonic()
    path = write_report(args.run_dirs)
    print(json.dumps({"report": str(path), "bytes": path.stat().st_size,
                      "seconds": round(time.monotonic() - start, 2)}))
    return 0
