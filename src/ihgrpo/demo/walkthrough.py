"""End-to-end walkthrough of the delayed and coupled protocols with a scripted model.

The "model" is a fixed script of turns (no weights are involved); everything else is real:
pending-code detection, execution in the isolated persistent sandbox, observations, answer
extraction and checking. It shows what a trajectory looks like under each protocol.
"""

from __future__ import annotations

import json
from pathlib import Path

from ihgrpo.protocol import (EXECUTE_TOKEN, Mode, TurnEnd, build_prompt, coupled_block_end,
                             extract_boxed, format_observation, next_action, pending_code)
from ihgrpo.sandbox import SandboxPool

QUESTION = "What is the remainder when 7^2026 + 2026^7 is divided by 1000?"
GOLD = str((pow(7, 2026, 1000) + pow(2026, 7, 1000)) % 1000)

# One model text, as a delayed-protocol policy would write it: two deferred blocks, one
# execution, then a block that reuses the persistent variables, then the answer.
DELAYED_TURNS = [
    "First the two powers modulo 1000.\n```python\na = pow(7, 2026, 1000)\n```\n"
    "Next the second term.\n```python\nb = pow(2026, 7, 1000)\nprint(a, b)\n```\n" + EXECUTE_TOKEN,
    "Now add them and reduce.\n```python\nprint((a + b) % 1000)\n```\n" + EXECUTE_TOKEN,
    "So the remainder is \\boxed{%s}." % GOLD,
]


def run_delayed(pool: SandboxPool, session: str, max_turns: int = 5) -> list[dict]:
    """Plays DELAYED_TURNS through the delayed protocol; returns the trajectory's segments."""
    segments: list[dict] = [{"role": "prompt", "text": build_prompt(QUESTION, Mode.DELAYED)}]
    window = ""  # model text since the previous execution
    for turn, text in enumerate(DELAYED_TURNS, start=1):
        segments.append({"role": "model", "text": text})
        window += text
        end = TurnEnd.EXECUTE if text.endswith(EXECUTE_TOKEN) else TurnEnd.EOS
        if next_action(end, turn, max_turns) != "execute":
            break
        code = pending_code(window)
        result = pool.execute_sync(session, code) if code else None
        obs = format_observation(result, nothing_pending=code is None)
        segments.append({"role": "observation", "text": obs, "code": code})
        window = ""
    return segments


def run_coupled(pool: SandboxPool, session: str) -> list[dict]:
    """The coupled protocol on the same text: each block runs as soon as its fence closes."""
    text = "".join(t.replace(EXECUTE_TOKEN, "") for t in DELAYED_TURNS)
    segments: list[dict] = [{"role": "prompt", "text": build_prompt(QUESTION, Mode.COUPLED)}]
    while text:
        cut = coupled_block_end(text)
        if cut is None:
            segments.append({"role": "model", "text": text})
            break
        segments.append({"role": "model", "text": text[:cut]})
        code = pending_code(text[:cut])
        obs = format_observation(pool.execute_sync(session, code))
        segments.append({"role": "observation", "text": obs, "code": code})
        text = text[cut:]
    return segments


def main(out_dir: str | None = None) -> int:
    with SandboxPool(max_workers=2, timeout_s=5.0) as pool:
        print(f"sandbox isolation: {pool.isolation}\n")
        report = {}
        for name, segments in (("delayed", run_delayed(pool, "delayed")),
                               ("coupled", run_coupled(pool, "coupled"))):
            print(f"===== {name} protocol =====")
            for seg in segments[1:]:
                tag = "MODEL" if seg["role"] == "model" else "OBS  "
                for line in seg["text"].strip("\n").splitlines():
                    print(f"{tag} | {line}")
            model_text = "".join(s["text"] for s in segments if s["role"] == "model")
            answer = extract_boxed(model_text)
            executions = sum(s["role"] == "observation" for s in segments)
            ok = answer == GOLD
            print(f"answer {answer!r} (gold {GOLD}): {'correct' if ok else 'WRONG'}; "
                  f"executions: {executions}\n")
            report[name] = {"answer": answer, "gold": GOLD, "correct": ok,
                            "executions": executions, "segments": segments}
    if out_dir:
        path = Path(out_dir)
        path.mkdir(parents=True, exist_ok=True)
        (path / "walkthrough.json").write_text(json.dumps(report, indent=2))
        print(f"wrote {path / 'walkthrough.json'}")
    print("The RL demo (a tiny model learning delayed tool use) is not built yet; "
          "this walkthrough exercises the protocol and the sandbox end to end.")
    return 0 if all(r["correct"] for r in report.values()) else 1
