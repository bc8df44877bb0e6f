"""Small-sample statistics of the demo's comparisons, against textbook values."""

import pytest

from ihgrpo.demo.stats import mean_ci, paired_t, sign_flip_p, t_quantile, t_sf2


@pytest.mark.parametrize("df, q975", [(1, 12.7062), (4, 2.7764), (9, 2.2622), (30, 2.0423)])
def test_t_quantiles_match_the_table(df, q975):
    assert t_quantile(0.975, df) == pytest.approx(q975, abs=1e-4)
    assert t_sf2(q975, df) == pytest.approx(0.05, abs=1e-4)


def test_mean_ci():
    m, lo, hi = mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])  # sd 1.5811, se 0.7071, t 2.7764
    assert m == 3.0 and lo == pytest.approx(3 - 1.9632, abs=1e-4) and hi == pytest.approx(3 + 1.9632, abs=1e-4)
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5) and mean_ci([0.2, 0.2]) == (0.2, 0.2, 0.2)


def test_paired_t():
    # differences 1, 2, 3, 4, 6: mean 3.2, sd 1.9235, t = 3.7199, p = 0.02048 (df 4, integrating the density)
    t, p = paired_t([2, 4, 6, 8, 11], [1, 2, 3, 4, 5])
    assert t == pytest.approx(3.7199, abs=1e-4) and p == pytest.approx(0.02048, abs=1e-5)
    assert paired_t([0.5, 0.7], [0.5, 0.7]) == (0.0, 1.0)  # identical on every seed: no evidence at all
    assert paired_t([0.6, 0.7], [0.5, 0.6])[1] == 0.0  # the same nonzero difference on every seed
    with pytest.raises(ValueError, match="paired"):
        paired_t([1.0], [2.0])


def test_sign_flip_is_exact():
    assert sign_flip_p([1, 1, 1, 1, 1], [0, 0, 0, 0, 0]) == 2 / 32  # the smallest p with 5 pairs
    assert sign_flip_p([0.5] * 5, [0.5] * 5) == 1.0
    # differences 3, 1, -1 (sum 3): signed sums +-5, +-3, +-3, +-1, so 6 of the 8 reach |3|
    assert sign_flip_p([3, 1, 0], [0, 0, 1]) == 6 / 8


def test_lambda_report_from_a_study_stopped_early(tmp_path):
    """bench/lambda_report.py on rows as runs.jsonl holds them: the table, the paired tests, the diagnostic."""
    import importlib.util
    import json
    from pathlib import Path

    script = Path(__file__).parents[1] / "bench" / "lambda_report.py"
    spec = importlib.util.spec_from_file_location("lambda_report", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def row(method, lam, seed, acc, kl):
        train = [{"step": 1, "reward": 0.5, "diag/q_kl_at_E": kl, "diag/e_share_at_E": 0.5},
                 {"step": 2, "reward": 0.6, "diag/q_kl_at_E": kl / 2, "diag/e_share_at_E": 0.7}]
        return {"method": method, "lam": lam, "c_mask": "all", "mode": "delayed", "seed": seed, "accuracy": acc,
                "delay_call_rate": 0.75, "tool_calls_per_trajectory": 1.0, "turns_per_trajectory": 2.0,
                "time_s": 60.0, "rl_steps": 2, "curves": {"eval": [{"step": 0, "accuracy": 0.3},
                                                                   {"step": 2, "accuracy": acc}], "train": train}}

    study = tmp_path / "study"
    study.mkdir()
    rows = [row("GRPO-D", 0.0, s, 0.5 + 0.01 * s, 4e-4) for s in range(3)]
    rows += [row("EH-GRPO", 1.0, s, 0.6 + 0.01 * s, 1e-4) for s in range(3)]
    (study / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prefix = tmp_path / "docs" / "study"
    assert mod.main([str(study), "--out-prefix", str(prefix)]) == 0
    md = prefix.with_suffix(".md").read_text()
    assert "| GRPO-D (λ=0) | 3 | 0.510 |" in md and "0.500, 0.510, 0.520" in md
    # +0.1 on every seed: the sign-flip p is its minimum 2/8, the t-test's differences have sd 0
    assert "| EH-GRPO (λ=1) | 3 | +0.100 |" in md and "| 3 / 0 / 0 |" in md and "| 0.250 |" in md
    # q_kl x1e-4 at step 1, its ratio to GRPO-D's, the mean over steps; the training curves are the same
    assert "| EH-GRPO (λ=1) | 1.000 [1.000, 1.000] | 0.2500 [0.2500, 0.2500] | 0.750 [0.750, 0.750] |" in md
    assert "| 3 of 3 |" in md
    assert json.loads(prefix.with_suffix(".json").read_text()) == rows
    assert prefix.with_suffix(".png").stat().st_size > 0
    # the written reading survives a regeneration
    prefix.with_suffix(".md").write_text(md.replace("(to be written)", "No difference."))
    mod.main([str(study), "--out-prefix", str(prefix)])
    assert "No difference." in prefix.with_suffix(".md").read_text()
