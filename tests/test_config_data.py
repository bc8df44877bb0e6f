"""Typed config from YAML + overrides, and dataset loading with clear errors."""

from __future__ import annotations

import json

import pytest

from ihgrpo.cli import main
from ihgrpo.config import ConfigError, dump_config, load_config
from ihgrpo.data import DataError, Example, PromptSampler, load_examples


def test_packaged_paper_configs_follow_the_paper():
    for name, lam in (("qwen3-1.7b", 1e-3), ("qwen3-4b", 1e-3), ("qwen3-8b", 1e-2)):
        cfg = load_config(name)
        assert cfg.algo.lam == lam and cfg.rollout.max_turns == 5 and cfg.rollout.group_size == 8
        assert cfg.prompts_per_step == 16 and cfg.optim.lr == 1e-6 and cfg.optim.betas == (0.9, 0.99)
        assert (cfg.algo.clip_low, cfg.algo.clip_high, cfg.algo.dual_clip) == (0.2, 0.28, 3.0)
        assert cfg.rollout.max_observation_tokens == 256
        assert cfg.algo.oversample == 3.0 and cfg.algo.kl_coef == 0 and cfg.algo.entropy_coef == 0
        # the release's budgets: 8,000 generated tokens per turn within a 16,000-token context
        assert cfg.rollout.max_tokens_per_turn == 8000 and cfg.rollout.max_context_tokens == 16000
        assert cfg.rollout.max_response_tokens >= cfg.rollout.max_context_tokens  # the context binds
        # void and truncated trajectories leave the loss; groups with < 4 of 8 complete rollouts go
        assert cfg.algo.mask_void and cfg.algo.mask_truncated and cfg.algo.min_valid == 4
        # SimpleRL MATH levels 3-5 + DeepScaleR
        assert isinstance(cfg.data.train, list) and len(cfg.data.train) == 2
        assert cfg.data.train[0].endswith("simplelr_math35_train.parquet") and "DeepScaleR" in cfg.data.train[1]
    assert load_config(None).algo.min_valid == 0 and load_config(None).rollout.max_context_tokens is None


def test_several_training_sources(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"question": "1+1?", "answer": 2}\n{"question": "2+2?", "answer": 4}\n')
    b.write_text('{"question": "3+3?", "answer": 6}\n')
    cfg = load_config(None, [f"data.train=[{a}, {b}]", "data.max_examples=1"])
    assert cfg.data.train == [str(a), str(b)]
    ex = load_examples(cfg.data.train, limit=cfg.data.max_examples)  # the limit is per source
    assert [(e.question, e.source) for e in ex] == [("1+1?", "a"), ("3+3?", "b")]
    assert len(load_examples([str(a), str(b)])) == 3 and len(load_examples(str(a))) == 2
    assert load_config(None, [f"data.train={a}"]).data.train == str(a)
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"data:\n  train:\n    - {a}\n    - {b}\n")
    assert load_config(str(yaml_file)).data.train == [str(a), str(b)]
    dump_config(load_config(str(yaml_file)), tmp_path / "d.yaml")
    assert load_config(str(tmp_path / "d.yaml")).data.train == [str(a), str(b)]
    with pytest.raises(DataError, match="no dataset"):
        load_examples([])
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, ["data.train=[1, [2]]"])


def test_min_valid_cannot_exceed_the_group():
    with pytest.raises(ConfigError, match="algo.min_valid"):
        load_config("qwen3-1.7b", ["rollout.group_size=2"])  # min_valid 4 of 2: every group would go
    with pytest.raises(ConfigError, match="rollout.max_context_tokens"):
        load_config(None, ["rollout.max_context_tokens=0"])


def test_overrides_and_round_trip(tmp_path):
    cfg = load_config("qwen3-1.7b", ["algo.lam=0", "max_steps=7", "rollout.mode=coupled",
                                      "optim.betas=[0.8, 0.9]", "resume=true", "rollout.max_tokens_per_turn=null"])
    assert (cfg.algo.lam, cfg.max_steps, cfg.rollout.mode, cfg.optim.betas, cfg.resume) == \
        (0.0, 7, "coupled", (0.8, 0.9), True)
    dump_config(cfg, tmp_path / "c.yaml")
    again = load_config(str(tmp_path / "c.yaml"))
    assert again == cfg


@pytest.mark.parametrize("overrides, match", [
    (["algo.lamda=1"], "unknown config key 'algo.lamda'"),
    (["bogus=1"], "unknown config key 'bogus'"),
    (["max_steps=ten"], "max_steps: expected an integer"),
    (["rollout.mode=eager"], "rollout.mode: must be one of"),
    (["resume=maybe"], "resume: expected true or false"),
    (["rollout.group_size=1"], "group_size"),
    (["rollout.max_batch_rows=0"], "rollout.max_batch_rows: must be >= 1"),
    (["novalue"], "key=value"),
    (["algo=3"], "algo: expected a mapping"),
])
def test_bad_config_is_a_one_line_error_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match) as exc:
        load_config("qwen3-1.7b", overrides)
    assert "\n" not in str(exc.value)


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="no config 'nope'"):
        load_config("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(str(bad))


def test_cli_exits_2_with_one_line(tmp_path, capsys):
    assert main(["train", "qwen3-1.7b", "algo.lamda=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "algo.lamda" in err
    assert main(["train", "qwen3-1.7b", f"data.train={tmp_path}/missing.jsonl", "model.path=/nonexistent/model"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_jsonl_loading_and_row_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"question": "1+1?", "answer": 2}\n\n{"question": "2+2?", "answer": "4"}\n')
    ex = load_examples(str(good))
    assert [(e.question, e.answer) for e in ex] == [("1+1?", "2"), ("2+2?", "4")]
    cases = {
        '{"question": "q"}\n': "line 1: missing or empty answer field 'answer'",
        '{"question": "", "answer": "1"}\n': "missing or empty question",
        '{"question": "q", "answer": "1"}\nnot json\n': "line 2: invalid JSON",
        '[1, 2]\n': "expected an object",
        "": "no rows",
    }
    for text, match in cases.items():
        f = tmp_path / "bad.jsonl"
        f.write_text(text)
        with pytest.raises(DataError, match=match.split("|")[-1]) as exc:
            load_examples(str(f))
        assert str(f) in str(exc.value) and "\n" not in str(exc.value)
    custom = tmp_path / "custom.jsonl"
    custom.write_text(json.dumps({"problem": "p", "solution_value": "7"}) + "\n")
    assert load_examples(str(custom), question_key="problem", answer_key="solution_value")[0].answer == "7"


def test_parquet_verl_format(shared_data):
    ex = load_examples(str(shared_data / "math" / "aime24.parquet"))
    assert len(ex) == 30 and ex[0].answer == "204" and "Aya" in ex[0].question
    ex = load_examples(str(shared_data / "math" / "math500.parquet"), limit=5)
    assert ex[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)" and len(ex) == 5


def test_corrupt_parquet_and_missing_ground_truth(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="not a readable parquet"):
        load_examples(str(broken))
    table = pa.Table.from_pylist([
        {"prompt": [{"role": "user", "content": "What is 1+1?"}], "reward_model": {"ground_truth": "2"}},
        {"prompt": [{"role": "user", "content": "What is 2+2?"}], "reward_model": {"ground_truth": None}},
    ])
    f = tmp_path / "rows.parquet"
    pq.write_table(table, f)
    with pytest.raises(DataError, match=r"row 1: missing ground truth"):
        load_examples(str(f))
    with pytest.raises(DataError, match="file not found"):
        load_examples(str(tmp_path / "absent.parquet"))


def test_prompt_sampler_is_seeded_and_resumable():
    ex = [Example(str(i), str(i), str(i)) for i in range(5)]
    a = PromptSampler(ex, seed=3)
    first = [e.id for e in a.take(7)]
    state = a.state_dict()
    rest = [e.id for e in a.take(6)]
    b = PromptSampler(ex, seed=3)
    assert [e.id for e in b.take(7)] == first
    c = PromptSampler(ex, seed=3)
    c.load_state_dict(state)
    assert [e.id for e in c.take(6)] == rest
    assert sorted(first[:5]) == sorted(map(str, range(5)))  # one epoch is a permutation
    with pytest.raises(DataError, match="checkpoint was made on 5"):
        PromptSampler(ex[:4], seed=3).load_state_dict(state)


def test_text_and_optional_overrides_keep_what_was_written():
    cfg = load_config("qwen3-1.7b", [r"rollout.instruction=Answer: put it in \boxed{}.",
                                     "rollout.max_tokens_per_turn=none", "model.path=123"])
    assert cfg.rollout.instruction == r"Answer: put it in \boxed{}."  # YAML would read a mapping
    assert cfg.rollout.max_tokens_per_turn is None and cfg.model.path == "123"
    with pytest.raises(ConfigError, match="rollout.top_k: must be >= 0"):
        load_config("qwen3-1.7b", ["rollout.top_k=-1"])


def test_eval_config_shares_the_mechanism_and_layers_benchmark_defaults():
    from ihgrpo.config import EvalConfig, RolloutSection, load_eval_config, with_defaults

    cfg = load_eval_config(None, ["max_turns=2", "eval.k=4", "model=some/model", "protocol=coupled"])
    assert (cfg.rollout.max_turns, cfg.eval.k, cfg.model.path, cfg.rollout.mode) == (2, 4, "some/model", "coupled")
    assert cfg.rollout.top_p == 0.7 and EvalConfig().rollout.top_p == 0.7  # differs from training's 1.0
    demo = {"rollout.max_turns": 4, "rollout.max_response_tokens": 512, "rollout.instruction": "demo's"}
    bench = with_defaults(cfg, demo)  # a benchmark's defaults go under the user's settings
    assert (bench.rollout.max_turns, bench.rollout.max_response_tokens, bench.rollout.instruction) == \
        (2, 512, "demo's")
    assert bench.eval.k == 4 and cfg.rollout.max_response_tokens == 8000
    with pytest.warns(FutureWarning, match="'batch' is deprecated; use 'batch_size'"):
        assert load_eval_config(None, ["batch=3"]).eval.batch_size == 3
    for bad, match in ((["temprature=1"], "unknown config key 'temprature'"),
                       (["eval.k=0"], "eval.k: must be >= 1"), (["rollout.mode=eager"], "rollout.mode: must be one")):
        with pytest.raises(ConfigError, match=match) as exc:
            load_eval_config(None, bad)
        assert "\n" not in str(exc.value)
    # one builder for the engine's objects
    r = RolloutSection(max_turns=3, max_response_tokens=100, max_tokens_per_turn=40, top_k=5, instruction="x")
    rc, sp = r.rollout_config(), r.sampling_params()
    assert (rc.max_turns, rc.max_response_tokens, rc.max_tokens_per_turn, rc.instruction) == (3, 100, 40, "x")
    assert (sp.temperature, sp.top_p, sp.top_k, sp.max_new_tokens) == (1.0, 1.0, 5, 40)


def test_eval_config_file(tmp_path):
    from ihgrpo.config import load_eval_config

    path = tmp_path / "eval.yaml"
    path.write_text("model:\n  path: m\nrollout:\n  top_p: 0.95\neval:\n  k: 2\n")
    cfg = load_eval_config(str(path), ["top_p=0.5"])
    assert (cfg.model.path, cfg.rollout.top_p, cfg.eval.k) == ("m", 0.5, 2)
