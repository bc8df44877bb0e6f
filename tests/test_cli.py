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
