"""``ihgrpo demo --compare``: methods x lambdas x seeds, each from the same SFT start under one RL budget.

    ihgrpo demo --compare                                   IH-GRPO, GRPO-D, EH-GRPO, GRPO-C; 2 seeds
    ihgrpo demo --compare --lams 0,1e-3,1e-2,1e-1,1 --seeds 5 --cmask-decision-lams 1   the lambda study

Each finished run is appended to ``runs.jsonl`` in the output directory, and a rerun with the same
budget skips the (method, lam, c_mask, seed) rows already there: a killed study loses at most the run
in progress. The outputs: compare.json (``runs``: one row per run; ``table``), compare.md, compare.png
(bars), compare_curves.png (mean held-out curves with 95% intervals).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ihgrpo.config import ConfigError

from .stats import mean_ci

RUNS_FILE = "runs.jsonl"


@dataclass(frozen=True)
class Arm:
    """One row of the comparison: the same RL budget, a different loss or protocol."""

    lam: float
    c_mask: str = "all"  # "all" (the release) or "decision"
    coupled: bool = False  # GRPO-C: coupled execution, trained and evaluated under it

    @property
    def method(self) -> str:
        if self.coupled:
            return "GRPO-C"
        if self.lam == 0:
            return "GRPO-D"
        return "EH-GRPO" if self.lam == 1 and self.c_mask == "all" else "IH-GRPO"

    @property
    def label(self) -> str:
        if self.coupled:
            return "GRPO-C"
        cm = ", decision c-mask" if self.c_mask == "decision" else ""
        return f"{self.method} (λ={self.lam:g}{cm})"

    @property
    def slug(self) -> str:
        return self.method if self.coupled else f"{self.method}-lam{self.lam:g}-{self.c_mask}"

    def overrides(self) -> list[str]:
        return [f"algo.lam={self.lam!r}", f"algo.c_mask={self.c_mask}",
                f"rollout.mode={'coupled' if self.coupled else 'delayed'}"]

    def key(self, seed: int) -> tuple:
        return (self.method, float(self.lam), self.c_mask, int(seed))


def _row_key(row: dict) -> tuple:
    """A finished row's (method, lam, c_mask, seed), as :meth:`Arm.key` gives it."""
    return row["method"], float(row["lam"]), row["c_mask"], int(row["seed"])


def _arm_rows(arm: "Arm", runs: list[dict]) -> list[dict]:
    return [r for r in runs if _row_key(r)[:3] == arm.key(0)[:3]]


def parse_lams(text: str | None, flag: str = "--lams") -> tuple[float, ...]:
    """"0,1e-3,1" -> (0.0, 0.001, 1.0); a clear ValueError for anything else."""
    if text is None or not text.strip():
        return ()
    out = []
    for part in text.split(","):
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"{flag}: {part.strip()!r} is not a number; give comma-separated values, "
                             f"e.g. {flag} 0,1e-3,1") from None
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{flag}: lambda must be a finite number >= 0, got {part.strip()!r}")
        if v in out:
            raise ValueError(f"{flag}: lambda {v:g} is listed twice")
        out.append(v)
    return tuple(out)


def plan(lams=(), *, coupled: bool = True, cmask_decision_lams=()) -> list[Arm]:
    """The arms in table order; no lams: the classic four (IH-GRPO 1e-3, GRPO-D, EH-GRPO, GRPO-C)."""
    arms = [Arm(lam) for lam in (lams or (1e-3, 0.0, 1.0))]
    arms += [Arm(lam, "decision") for lam in cmask_decision_lams]
    if coupled:
        arms.append(Arm(0.0, coupled=True))
    return arms


def budget_of(settings, overrides, curve_evals: int) -> dict:
    """What every run of one study shares; a rerun with another budget must not mix into it."""
    blob = {"settings": asdict(settings), "overrides": list(overrides), "curve_evals": curve_evals}
    blob["id"] = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return blob


def load_runs(path: Path, budget_id: str) -> list[dict]:
    """Finished rows of runs.jsonl; a torn last line (killed mid-write) is dropped from the file."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows, good = [], []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ConfigError(f"{path}:{i + 1} is not JSON; remove the line or use another --out") from None
        if row.get("budget") != budget_id:
            raise ConfigError(f"{path} holds runs of another budget ({row.get('budget')} != {budget_id}: other "
                             f"settings or overrides); use another --out or the same settings")
        rows.append(row)
        good.append(line)
    if len(good) != len(lines):
        path.write_text("".join(g + "\n" for g in good))
    return rows


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _curves(history: list[dict], before: dict | None) -> dict:
    """Held-out curve points (step 0 = the SFT start) and the per-step training metrics."""
    ev = [{"step": 0, **{k: before[k] for k in ("accuracy", "delay_call_rate", "tool_calls_per_trajectory")}}] \
        if before else []
    ev += [{"step": m["step"], **{k[5:]: m[k] for k in m if k.startswith("eval/")}} for m in history
           if "eval/accuracy" in m]
    keys = ("reward", "rollout/delay_call_rate", "rollout/tool_calls_per_trajectory", "no_signal")
    train = [{"step": m["step"], **{k: m[k] for k in m if k in keys or k.startswith("diag/")}} for m in history]
    return {"eval": ev, "train": train}


def run_compare(out_dir, *, overrides=(), seeds: int = 2, lams=(), coupled: bool = True,
                cmask_decision_lams=(), curve_evals: int = 5, log=print, settings=None) -> dict:
    """Every arm x seed under one RL budget from one SFT start (resumable); writes the outputs.

    Coupled (GRPO-C) starts from the delayed SFT model and is evaluated under its own protocol,
    as the paper's C baselines are trained and evaluated under coupled execution. ``curve_evals``
    held-out evaluations on ``settings.n_curve`` problems along each run (0: none).
    """
    from .pipeline import DemoSettings, evaluate, heldout_problems, rl_config, run_rl, sft_start, summary

    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = settings or DemoSettings.full()
    arms = plan(lams, coupled=coupled, cmask_decision_lams=cmask_decision_lams)
    budget = budget_of(settings, overrides, curve_evals)
    (out / "budget.json").write_text(json.dumps(budget, indent=2, default=str))
    runs_path = out / RUNS_FILE
    done = {_row_key(r): r for r in load_runs(runs_path, budget["id"])}
    heldout = heldout_problems(settings=settings)
    curve_problems = heldout[:settings.n_curve] if curve_evals > 0 else []
    before: dict[str, dict] = {}  # per protocol: the SFT start on the curve problems (step 0)
    # seed-major: a study stopped early still has the same seeds in every arm
    todo = [(a, s) for s in range(seeds) for a in arms if a.key(s) not in done]
    log(f"[compare] {len(arms)} arms x {seeds} seeds: {len(todo)} runs to do, {len(arms) * seeds - len(todo)} "
        f"already in {runs_path}")
    for i, (arm, seed) in enumerate(todo):
        model, tok = sft_start(log=log, settings=settings)
        run_dir = out / f"{arm.slug}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a run killed midway starts over
        cfg = rl_config(run_dir, [*arm.overrides(), f"seed={seed}", "log.progress=false",
                                  "log.update_diagnostics=true", *overrides], settings)
        mode = cfg.rollout.mode
        if curve_problems and mode not in before:
            before[mode] = summary(evaluate(model, tok, curve_problems, max_turns=cfg.rollout.max_turns, mode=mode))
        t0 = time.perf_counter()
        every = max(1, math.ceil(cfg.max_steps / curve_evals)) if curve_evals > 0 else 0
        history = run_rl(model, tok, cfg, curve_problems=curve_problems, settings=settings, eval_every=every)
        res = summary(evaluate(model, tok, heldout, max_turns=cfg.rollout.max_turns, mode=mode))
        row = {"method": arm.method, "lam": float(arm.lam), "c_mask": arm.c_mask, "mode": mode, "seed": seed,
               **res, "time_s": time.perf_counter() - t0, "rl_steps": len(history), "budget": budget["id"],
               "curves": _curves(history, before.get(mode))}
        _append(runs_path, row)
        done[arm.key(seed)] = row
        log(f"[compare] {i + 1}/{len(todo)} {arm.label} seed {seed}: accuracy {res['accuracy']:.3f}, "
            f"delay-call rate {res['delay_call_rate']:.2f} ({row['time_s']:.0f} s)")
    runs = [done[a.key(s)] for a in arms for s in range(seeds)]
    return write_outputs(out, arms, runs, budget, log=log)


def write_outputs(out: Path, arms: list[Arm], runs: list[dict], budget: dict, *, log=print) -> dict:
    """compare.json, compare.md, compare.png and compare_curves.png from finished rows."""
    table = {}
    for arm in arms:
        rs = _arm_rows(arm, runs)
        m, lo, hi = mean_ci([r["accuracy"] for r in rs])
        table[arm.label] = {"method": arm.method, "lam": arm.lam, "c_mask": arm.c_mask, "accuracy_mean": m,
                            "accuracy_ci95": [lo, hi], "seeds": len(rs),
                            "delay_call_rate_mean": sum(r["delay_call_rate"] for r in rs) / len(rs),
                            "tool_calls_mean": sum(r["tool_calls_per_trajectory"] for r in rs) / len(rs)}
    (out / "compare.json").write_text(json.dumps({"budget": budget, "table": table, "runs": runs}, indent=2,
                                                 default=str))
    lines = ["| method | held-out accuracy (mean, 95% CI) | delay-call rate | tool calls / traj | seeds |",
             "|---|---|---|---|---|"]
    for name, t in table.items():
        lo, hi = t["accuracy_ci95"]
        lines.append(f"| {name} | {t['accuracy_mean']:.3f} [{lo:.3f}, {hi:.3f}] | "
                     f"{t['delay_call_rate_mean']:.2f} | {t['tool_calls_mean']:.2f} | {t['seeds']} |")
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    from .pipeline import _optional_figure

    _optional_figure(out / "compare.png", log, lambda path: plot_bars(table, path))
    _optional_figure(out / "compare_curves.png", log, lambda path: plot_mean_curves(arms, runs, path))
    return {"table": table, "runs": runs}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(table: dict, path: Path) -> None:
    plt = _plt()
    names = list(table)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(names)), 4))
    means = [table[n]["accuracy_mean"] for n in names]
    err = [[m - table[n]["accuracy_ci95"][0] for n, m in zip(names, means)],
           [table[n]["accuracy_ci95"][1] - m for n, m in zip(names, means)]]
    ax.bar(range(len(names)), means, yerr=err, capsize=4)
    ax.set_xticks(range(len(names)), names, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("held-out accuracy (mean, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_curve(rows: list[dict], part: str, key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """steps, mean, 95% low, 95% high of curves[part][*][key] over the rows (steps all rows share)."""
    per = [{p["step"]: p[key] for p in r["curves"][part] if key in p} for r in rows]
    steps = sorted(set.intersection(*(set(d) for d in per))) if per else []
    cis = [mean_ci([d[s] for d in per]) for s in steps]
    return steps, [c[0] for c in cis], [c[1] for c in cis], [c[2] for c in cis]


def plot_mean_curves(arms: list[Arm], runs: list[dict], path: Path,
                     panels=(("eval", "accuracy", "held-out accuracy (curve problems)"),
                             ("train", "reward", "training reward"),
                             ("train", "rollout/delay_call_rate", "delay-call rate (training rollouts)"),
                             ("train", "diag/q_kl_at_E", "KL(q before || q after) at E tokens (log)"))) -> None:
    """Mean over seeds with a 95% band (clipped to [0, 1] for rates; log scale for the KL), one line per arm."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (part, key, title) in zip(axes.flat, panels):
        for arm in arms:
            rs = _arm_rows(arm, runs)
            steps, m, lo, hi = mean_curve(rs, part, key)
            if not steps:
                continue
            (line,) = ax.plot(steps, m, label=arm.label, marker="o" if len(steps) < 12 else None, ms=3)
            if key.startswith("diag/q_kl"):
                ax.set_yscale("log")
                lo = [max(v, x / 10) for v, x in zip(lo, m)]
            else:
                lo, hi = [max(v, 0.0) for v in lo], [min(v, 1.0) for v in hi]
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.12)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
