"""The outputs of an evaluation: results.md (a table like the paper's), chart.png, rollouts.html."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ihgrpo.utils import atomic_write_text

from .benchmarks import PAPER_TITLES, Benchmark
from .ledger import LEDGER, SampleLedger

__all__ = ["results_markdown", "write_chart", "write_outputs"]


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def results_markdown(results: dict) -> str:
    per = results["benchmarks"]
    s = results["settings"]
    names = list(per)
    head = ["Model"] + [f"{PAPER_TITLES.get(n, n)} (avg@{per[n]['k']})" for n in names] + ["Mean"]
    model = Path(s["model"]).name or s["model"]
    row = [f"{model} ({s['protocol']})"] + [_pct(per[n]["avg@k"]) for n in names] + [_pct(results["mean_of_benchmarks"])]
    lines = [f"# Evaluation of `{s['model']}`", "",
             f"Protocol {s['protocol']}, temperature {s['temperature']}, top_p {s['top_p']}, top_k {s['top_k']}, "
             f"seed {s['seed']}. Scores in percent; the mean is the unweighted mean of avg@k.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", "",
             "## Details", "",
             "| Benchmark | k | problems | avg@k | pass@k | delay-call rate | tool calls / traj. | "
             "code error rate | truncated | void | response tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        m = per[n]
        lines.append(f"| {n} | {m['k']} | {m['n_problems']} | {_pct(m['avg@k'])} | {_pct(m['pass@k'])} | "
                     f"{m['delay_call_rate']:.3f} | {m['tool_calls_per_trajectory']:.2f} | "
                     f"{m['code_error_rate']:.3f} | {m['truncated_fraction']:.3f} | {m['void_fraction']:.3f} | "
                     f"{m['mean_response_tokens']:.0f} |")
    if results.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"{x['benchmark']} ({x['reason']})" for x in results["skipped"])]
    return "\n".join(lines) + "\n"


def write_chart(path: Path, results: dict) -> bool:
    """avg@k and pass@k per benchmark as grouped bars (matplotlib, Agg). False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    per = results["benchmarks"]
    names = list(per)
    x = list(range(len(names)))
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 3.6), dpi=120)
    avg = [100 * per[n]["avg@k"] for n in names]
    pas = [100 * per[n]["pass@k"] for n in names]
    b1 = ax.bar([i - w / 2 for i in x], avg, w, label="avg@k", color="#4C72B0")
    b2 = ax.bar([i + w / 2 for i in x], pas, w, label="pass@k", color="#DD8452")
    for bars in (b1, b2):
        for bar in bars:
            ax.annotate(f"{bar.get_height():.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, [f"{PAPER_TITLES.get(n, n)}\nk={per[n]['k']}" for n in names], fontsize=8)
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.set_title(f"{Path(results['settings']['model']).name} ({results['settings']['protocol']}): "
                 f"mean avg@k {100 * results['mean_of_benchmarks']:.1f}", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def _viewer_records(benches: list[Benchmark], ledger: SampleLedger, n: int) -> list[dict]:
    out = []
    for b in benches:
        first = [ledger.records[(b.name, p, 0)] for p in range(min(n, len(b.problems)))]
        if n and first and not any(r["correct"] for r in first):
            good = next((r for (name, p, k), r in sorted(ledger.records.items())
                         if name == b.name and p < len(b.problems) and k < b.k and r["correct"]), None)
            if good is not None:
                first[-1] = good
        for r in first:
            r = dict(r)
            r["title"] = f"{b.name} · problem {r['problem']} · sample {r['sample']}"
            out.append(r)
    return out


def write_outputs(out: Path, results: dict, benches: list[Benchmark], ledger: SampleLedger, cfg, echo) -> None:
    """results.json, results.md, chart.png and rollouts.html in ``out``."""
    from ihgrpo.viewer import write_viewer

    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    md = results_markdown(results)
    atomic_write_text(out / "results.md", md)
    written = ["results.json", "results.md", LEDGER]
    if write_chart(out / "chart.png", results):
        written.append("chart.png")
    else:
        echo("note: no chart.png: the package 'matplotlib' is not installed (pip install matplotlib)")
    if cfg.eval.viewer_samples:
        path = cfg.model.path
        write_viewer(out / "rollouts.html", _viewer_records(benches, ledger, cfg.eval.viewer_samples),
                     title=f"ihgrpo eval: {Path(path).name or path}")
        written.append("rollouts.html")
    echo("")
    echo(md.split("## Details")[0].split("\n", 2)[2].strip())
    echo(f"wrote {', '.join(written)} in {out}")
