"""The lambda study's report: a study directory of ``ihgrpo demo --compare`` -> docs/lambda-study.{md,json,png}.

    python bench/lambda_report.py /work/lambda-study            # writes docs/lambda-study.*
    python bench/lambda_report.py DIR --out-prefix /tmp/report  # elsewhere

Reads DIR/compare.json (or, for a study stopped early, DIR/runs.jsonl) and writes:
  PREFIX.json  the runs list;
  PREFIX.md    per arm: mean held-out accuracy, 95% t interval, per-seed values; each arm against
               lambda = 0 on the same seeds (paired t-test, exact sign-flip test); the update
               diagnostic; a link to the plot. Text after the line READING_MARK in an existing
               PREFIX.md (the written reading of the results) is kept;
  PREFIX.png   mean curves over seeds with 95% bands (ihgrpo.demo.compare.plot_mean_curves).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from ihgrpo.demo.compare import RUNS_FILE, Arm, plot_mean_curves
from ihgrpo.demo.stats import mean_ci, paired_t, sign_flip_p

READING_MARK = "<!-- reading: kept when the report is regenerated -->"
ROOT = Path(__file__).resolve().parent.parent


def load(study: Path) -> tuple[list[dict], dict]:
    comp = study / "compare.json"
    runs = [json.loads(line) for line in (study / RUNS_FILE).read_text().splitlines() if line.strip()] \
        if (study / RUNS_FILE).exists() else []
    budget = json.loads((study / "budget.json").read_text()) if (study / "budget.json").exists() else {}
    if comp.exists():
        saved = json.loads(comp.read_text())
        if len(saved["runs"]) >= len(runs):
            return saved["runs"], saved.get("budget", budget)
    return runs, budget  # compare.json missing or older than runs.jsonl (a study stopped early)


def arms_of(runs: list[dict]) -> list[Arm]:
    seen: dict[tuple, Arm] = {}
    for r in runs:
        arm = Arm(r["lam"], r["c_mask"], coupled=r.get("mode") == "coupled")
        seen.setdefault((r["method"], r["lam"], r["c_mask"]), arm)
    order = {"GRPO-D": 0, "IH-GRPO": 1, "EH-GRPO": 1, "GRPO-C": 3}
    return sorted(seen.values(), key=lambda a: (a.coupled, a.c_mask != "all", order[a.method], a.lam))


def rows_of(runs, arm) -> dict[int, dict]:
    return {r["seed"]: r for r in runs if (r["method"], r["lam"], r["c_mask"]) == arm.key(0)[:3]}


def fmt_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def diag_means(row: dict, key: str) -> tuple[float | None, float | None]:
    """(value at step 1, mean over steps) of a per-step diagnostic."""
    vals = [p[key] for p in row["curves"]["train"] if key in p]
    return (vals[0] if vals else None), (statistics.fmean(vals) if vals else None)


def first_divergence(row: dict, base: dict) -> int | None:
    """The first RL step whose training rollouts differ from the base run's (rewards, delay-call rate,
    tool calls); None when all steps agree, i.e. the same seed sampled the same trajectories."""
    keys = ("reward", "rollout/delay_call_rate", "rollout/tool_calls_per_trajectory")
    for a, b in zip(row["curves"]["train"], base["curves"]["train"]):
        if any(a.get(k) != b.get(k) for k in keys):
            return a["step"]
    return None


def report(runs: list[dict], budget: dict, png_name: str) -> str:
    arms = arms_of(runs)
    seeds = sorted({r["seed"] for r in runs})
    base = next((a for a in arms if a.method == "GRPO-D"), None)
    steps = {r["rl_steps"] for r in runs}
    over = " ".join(budget.get("overrides", []))
    out = ["# The lambda study", "",
           f"`ihgrpo demo --compare` on one SFT start; every run has the same RL budget (configs/demo.yaml with "
           f"`{over}`: {', '.join(map(str, sorted(steps)))} RL steps of 8 prompts x 8 rollouts, T = 0.7, lr 5e-5); "
           f"held-out accuracy on {budget.get('settings', {}).get('n_heldout', 64)} problems, greedy, after RL. "
           f"Seeds {seeds[0]}-{seeds[-1]} ({len(seeds)} per arm); a seed fixes the RL sampling and the data order, "
           f"so arms with the same seed start from the same model on the same prompts.", "",
           "## Held-out accuracy", "",
           "| arm | n | mean | 95% CI | per seed (" + ", ".join(map(str, seeds)) + ") | delay-call rate | "
           "tool calls / traj | turns / traj |", "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        rs = rows_of(runs, arm)
        accs = [rs[s]["accuracy"] for s in seeds if s in rs]
        m, lo, hi = mean_ci(accs)
        per = ", ".join(f"{rs[s]['accuracy']:.3f}" if s in rs else "-" for s in seeds)
        mean = lambda k: statistics.fmean(r[k] for r in rs.values())  # noqa: E731
        out.append(f"| {arm.label} | {len(accs)} | {m:.3f} | [{lo:.3f}, {hi:.3f}] | {per} | "
                   f"{mean('delay_call_rate'):.2f} | {mean('tool_calls_per_trajectory'):.2f} | "
                   f"{mean('turns_per_trajectory'):.2f} |")
    if base is not None:
        b = rows_of(runs, base)
        out += ["", "## Each arm against lambda = 0 (GRPO-D), paired on seeds", "",
                "Difference = arm - GRPO-D in held-out accuracy, seed by seed. Paired t-test (two-sided) and the "
                f"exact sign-flip permutation test over all 2^n sign patterns (with n = {len(seeds)} pairs its "
                f"smallest possible p is {2 / 2 ** len(seeds):.4f}).", "",
                "`same rollouts`: seeds on which every training step's reward, delay-call rate and tool calls "
                "equal GRPO-D's, i.e. the update changed the policy too little to change one sampled token "
                "(otherwise the first step that differs).", "",
                "| arm | n pairs | mean difference | 95% CI | better / same / worse | paired t | p (t) | "
                "p (sign-flip) | same rollouts |", "|---|---|---|---|---|---|---|---|---|"]
        for arm in arms:
            if arm == base:
                continue
            rs = rows_of(runs, arm)
            common = [s for s in seeds if s in rs and s in b]
            if len(common) < 2:
                continue
            xs, ys = [rs[s]["accuracy"] for s in common], [b[s]["accuracy"] for s in common]
            d = [x - y for x, y in zip(xs, ys)]
            m, lo, hi = mean_ci(d)
            t, p = paired_t(xs, ys)
            tally = f"{sum(v > 0 for v in d)} / {sum(v == 0 for v in d)} / {sum(v < 0 for v in d)}"
            div = [first_divergence(rs[s], b[s]) for s in common]
            same = f"{div.count(None)} of {len(common)}"
            if any(v is not None for v in div):
                same += " (else from step " + ", ".join(str(v) for v in div if v is not None) + ")"
            out.append(f"| {arm.label} | {len(common)} | {m:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {tally} | {t:.2f} | "
                       f"{fmt_p(p)} | {fmt_p(sign_flip_p(xs, ys))} | {same} |")
    diag = [a for a in arms if any("diag/q_kl_at_E" in p for r in rows_of(runs, a).values()
                                   for p in r["curves"]["train"])]
    if diag:
        out += ["", "## The mechanism: how the update moves the logits at E tokens", "",
                "Logged per RL step (`log.update_diagnostics`, ihgrpo/diagnostics.py): at every sampled execute "
                "token E in the step's batch, the full-vocabulary logits before and after the optimizer step. "
                "`q_kl` = KL(q_before || q_after) of the non-E distribution q; `E share` = the share of the "
                "logit change that moves the log-odds of E rather than q (1 = only the execute decision moved). "
                "On free logits, lambda = 1 gives q_kl = 0 and E share = 1 exactly (tests/test_diagnostics.py); "
                "in the network the other tokens' gradients move shared weights, so q moves at E tokens for every "
                "lambda. Step 1 is a clean paired comparison: same model, same rollouts for a given seed, only the "
                "loss differs. Mean over seeds (95% CI).", "",
                "| arm | q_kl at step 1 (x1e-4) | step 1 q_kl / GRPO-D's (same seed) | q_kl, mean over steps (x1e-4) | "
                "E share at step 1 | E share, mean over steps |", "|---|---|---|---|---|---|"]
        b = rows_of(runs, base) if base is not None else {}
        for arm in diag:
            cells = []
            rs = rows_of(runs, arm)
            ratios = [diag_means(rs[s], "diag/q_kl_at_E")[0] / diag_means(b[s], "diag/q_kl_at_E")[0]
                      for s in seeds if s in rs and s in b and diag_means(b[s], "diag/q_kl_at_E")[0]]
            for key, scale in (("diag/q_kl_at_E", 1e4), ("diag/e_share_at_E", 1.0)):
                for which in (0, 1):
                    vals = [v for r in rows_of(runs, arm).values() if (v := diag_means(r, key)[which]) is not None]
                    m, lo, hi = mean_ci([v * scale for v in vals])
                    cells.append(f"{m:.3f} [{lo:.3f}, {hi:.3f}]")
            m, lo, hi = mean_ci(ratios) if ratios else (float("nan"),) * 3
            out.append(f"| {arm.label} | {cells[0]} | {m:.4f} [{lo:.4f}, {hi:.4f}] | {cells[1]} | {cells[2]} | "
                       f"{cells[3]} |")
    times = [r["time_s"] for r in runs]
    out += ["", f"![mean curves over seeds with 95% bands]({png_name})", "",
            f"{len(runs)} runs, {sum(times) / 60:.0f} minutes of RL and evaluation in all "
            f"({statistics.fmean(times):.0f} s "
            f"a run, one thread on a shared 2-core machine). Raw rows: `{png_name[:-4]}.json`.", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", type=Path, help="the --out directory of ihgrpo demo --compare")
    ap.add_argument("--out-prefix", type=Path, default=ROOT / "docs" / "lambda-study")
    args = ap.parse_args(argv)
    runs, budget = load(args.study)
    if not runs:
        raise SystemExit(f"no finished runs in {args.study}")
    prefix = args.out_prefix
    prefix.parent.mkdir(parents=True, exist_ok=True)
    md_path, png = prefix.with_suffix(".md"), prefix.with_suffix(".png")
    prefix.with_suffix(".json").write_text(json.dumps(runs, indent=1) + "\n")
    plot_mean_curves(arms_of(runs), runs, png)
    text = report(runs, budget, png.name)
    kept = md_path.read_text().split(READING_MARK, 1)[1] if md_path.exists() and READING_MARK in md_path.read_text() \
        else "\n## Reading\n\n(to be written)\n"
    md_path.write_text(text + "\n" + READING_MARK + kept)
    print(f"wrote {md_path}, {prefix.with_suffix('.json')}, {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
