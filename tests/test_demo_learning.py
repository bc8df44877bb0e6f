"""The demo learns: a reduced run of the real pipeline (``ihgrpo demo --quick``) must improve
held-out accuracy and the delay-call rate by a clear margin. This checks learning, not timing."""

from __future__ import annotations

import json

from ihgrpo.cli import main


def test_quick_demo_improves_the_policy(tmp_path, monkeypatch):
    monkeypatch.setenv("IHGRPO_CACHE", str(tmp_path / "cache"))  # a fresh SFT start, nothing reused
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    before, after = m["before"], m["after"]
    for d in (before, after):
        assert set(d) >= {"accuracy", "delay_call_rate", "tool_calls_per_trajectory", "turns_per_trajectory",
                          "response_tokens"}
    # 3-step problems under a 3-turn cap: the SFT start mostly executes after every block and runs
    # out of turns; RL has to learn to defer. A real improvement, measured on held-out problems.
    assert after["accuracy"] >= before["accuracy"] + 0.15, m
    assert after["delay_call_rate"] >= before["delay_call_rate"] + 0.2, m
    assert after["tool_calls_per_trajectory"] < before["tool_calls_per_trajectory"], m
    # the outputs a user gets
    assert (out / "curves.png").stat().st_size > 0
    html = (out / "rollouts.html").read_text()
    assert "<html" in html.lower() and "boxed" in html
    assert (out / "model" / "config.json").exists()
    # the trained model loads for `ihgrpo eval`
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(out / "model")
    AutoTokenizer.from_pretrained(out / "model")
