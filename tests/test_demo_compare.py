"""ihgrpo demo --compare: the lambda list, the runs list, resuming a killed study (tiny budget, seconds)."""

import json

import pytest

from ihgrpo.cli import main
from ihgrpo.config import ConfigError
from ihgrpo.demo.compare import RUNS_FILE, Arm, parse_lams, plan, run_compare
from ihgrpo.demo.pipeline import DemoSettings

TINY = DemoSettings(
    name="tiny", min_steps=3, max_steps=3, sft_steps=2, copy_steps=1, n_heldout=2, n_curve=2,
    model=(("hidden_size", 32), ("num_hidden_layers", 1), ("num_attention_heads", 2), ("num_key_value_heads", 1),
           ("head_dim", 16), ("intermediate_size", 64)),
    rl=("max_steps=2", "save_every=2", "prompts_per_step=1", "rollout.group_size=2", "rollout.max_turns=2",
        "rollout.max_response_tokens=16", "rollout.max_tokens_per_turn=8", "rollout.sandbox_workers=1",
        "log.tensorboard=false"))


def test_parse_lams():
    assert parse_lams("0,1e-3, 1e-2,0.1,1") == (0.0, 1e-3, 1e-2, 0.1, 1.0)
    assert parse_lams(None) == () and parse_lams("") == ()
    for bad, msg in (("0,x", "'x' is not a number"), ("0,-1", ">= 0"), ("1,1.0", "twice"), ("nan", ">= 0")):
        with pytest.raises(ValueError, match=msg):
            parse_lams(bad)


def test_plan_names_the_arms():
    assert [a.label for a in plan()] == ["IH-GRPO (λ=0.001)", "GRPO-D (λ=0)", "EH-GRPO (λ=1)", "GRPO-C"]
    arms = plan((0.0, 1e-2, 1.0), coupled=False, cmask_decision_lams=(1.0,))
    assert [(a.method, a.lam, a.c_mask) for a in arms] == [
        ("GRPO-D", 0.0, "all"), ("IH-GRPO", 1e-2, "all"), ("EH-GRPO", 1.0, "all"), ("IH-GRPO", 1.0, "decision")]
    assert len({a.key(0) for a in arms + [Arm(0.0, coupled=True)]}) == 5
    assert "algo.c_mask=decision" in arms[-1].overrides() and "rollout.mode=coupled" in Arm(0, coupled=True).overrides()


def test_cli_rejects_bad_lams_in_one_line(tmp_path, capsys):
    assert main(["demo", "--compare", "--lams", "0,abc", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--lams" in err and "'abc'" in err


def test_runs_list_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("IHGRPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "study"
    kw = dict(seeds=2, lams=(0.0,), cmask_decision_lams=(1.0,), curve_evals=1, settings=TINY, log=lambda m: None)
    res = run_compare(out, **kw)
    runs = res["runs"]
    assert [(r["method"], r["lam"], r["c_mask"], r["seed"]) for r in runs] == [
        ("GRPO-D", 0.0, "all", 0), ("GRPO-D", 0.0, "all", 1), ("IH-GRPO", 1.0, "decision", 0),
        ("IH-GRPO", 1.0, "decision", 1), ("GRPO-C", 0.0, "all", 0), ("GRPO-C", 0.0, "all", 1)]
    for r in runs:
        for key in ("accuracy", "delay_call_rate", "tool_calls_per_trajectory", "turns_per_trajectory"):
            assert 0 <= r[key] < 10, key
        assert [p["step"] for p in r["curves"]["eval"]] == [0, 2]  # the SFT start, then the last step
        assert [p["step"] for p in r["curves"]["train"]] == [1, 2]
    assert {r["mode"] for r in runs} == {"delayed", "coupled"}
    saved = json.loads((out / "compare.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(runs)) and list(saved["table"])[-1] == "GRPO-C"
    assert "| IH-GRPO (λ=1, decision c-mask) |" in (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 0 and (out / "compare_curves.png").stat().st_size > 0

    # kill after 4 runs, mid-write of the 5th: a rerun redoes only the missing runs, bit for bit
    lines = (out / RUNS_FILE).read_text().splitlines()
    (out / RUNS_FILE).write_text("\n".join(lines[:4]) + "\n" + lines[4][:40])
    logs = []
    again = run_compare(out, **{**kw, "log": logs.append})["runs"]
    assert any("2 runs to do, 4 already" in m for m in logs)
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in runs]
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in again] == strip
    assert len((out / RUNS_FILE).read_text().splitlines()) == 6

    # another budget must not mix into this study
    with pytest.raises(ConfigError, match="another budget"):
        run_compare(out, **{**kw, "overrides": ["optim.lr=1e-3"]})
