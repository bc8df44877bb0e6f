"""The command line's end-to-end job runs and checks its own answers."""

import json
import shutil
import sys

import pytest

from ihgrpo.cli import main
from ihgrpo.sandbox.isolation import probe_bwrap


@pytest.mark.skipif(probe_bwrap(sys.executable, shutil.which("bwrap")) is not None,
                    reason="bubblewrap is not usable on this machine")
def test_demo_walkthrough_runs_both_protocols(tmp_path, capsys):
    assert main(["demo", "--walkthrough", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "walkthrough.json").read_text())
    assert report["delayed"]["correct"] and report["coupled"]["correct"]
    # delayed defers the first block and runs two blocks at once; coupled runs each block
    assert report["delayed"]["executions"] == 2 and report["coupled"]["executions"] == 3
    first_exec = next(s for s in report["delayed"]["segments"] if s["role"] == "observation")
    assert first_exec["code"].count("pow(") == 2
    assert "sandbox isolation: bwrap" in capsys.readouterr().out


def test_cli_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fly"])
    assert exc.value.code == 2


def _capture(monkeypatch, name):
    import ihgrpo.cli as cli

    seen = {}
    monkeypatch.setattr(cli, name, lambda args: seen.setdefault("args", args) and 0)
    return seen


def test_options_and_settings_in_any_order(monkeypatch):
    seen = _capture(monkeypatch, "cmd_eval")
    assert main(["eval", "--model", "M", "--benchmark", "olympiad", "data_dir=DIR", "--k", "1",
                 "--out", "OUT", "max_turns=1", "--benchmark", "a=b.jsonl", "seed=3"]) == 0
    args = seen["args"]
    assert args.overrides == ["data_dir=DIR", "max_turns=1", "seed=3"]  # in the order given
    assert (args.model, args.k, args.out, args.benchmark) == ("M", 1, "OUT", ["olympiad", "a=b.jsonl"])
    seen = _capture(monkeypatch, "cmd_demo")
    assert main(["demo", "--quick", "max_steps=2", "--out", "D", "algo.lam=0"]) == 0
    args = seen["args"]
    assert args.overrides == ["max_steps=2", "algo.lam=0"] and args.quick and args.out == "D"
    seen = _capture(monkeypatch, "cmd_train")
    assert main(["train", "cpu-tiny", "max_steps=2", "seed=1"]) == 0
    assert seen["args"].config == "cpu-tiny" and seen["args"].overrides == ["max_steps=2", "seed=1"]


@pytest.mark.parametrize("argv", [
    ["demo", "--quick", "max_steps=2", "--out", "D", "--bogus"],
    ["demo", "--quick", "max_steps=2", "--out", "D", "stray"],
    ["train", "cpu-tiny", "--fast"],
])
def test_leftovers_that_are_not_settings_are_errors(monkeypatch, capsys, argv):
    seen = _capture(monkeypatch, "cmd_" + argv[0])
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "args" not in seen
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unrecognized arguments: " + argv[-1] in err and "key=value" in err
