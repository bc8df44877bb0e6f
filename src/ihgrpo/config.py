"""Typed configuration: dataclasses <- YAML file <- `key=value` overrides.

    cfg = load_config("configs/qwen3-1.7b.yaml", ["algo.lam=0", "max_steps=10"])

Unknown keys and bad values raise ConfigError, whose one-line message names the key; the CLI
turns it into exit status 2. The standard keys are top-level: `max_steps`, `save_every`,
`seed`, `output_dir`, `resume`; the rest live in sections (`algo.lam=0`, `rollout.max_turns=4`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

CONFIG_DIR = Path(__file__).with_name("configs")


class ConfigError(ValueError):
    """A bad configuration: the message is one line and names the key."""


@dataclass
class ModelConfig:
    path: str = ""  # a local directory or a Hugging Face name ("demo": the embedded demo's SFT start)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    attn_implementation: str | None = None


@dataclass
class DataConfig:
    train: str = ""  # parquet / JSONL path, a Hugging Face dataset name, or "demo"
    question_key: str = "question"  # for JSONL / HF datasets (verl parquet is detected)
    answer_key: str = "answer"
    split: str = "train"  # for Hugging Face datasets
    max_examples: int | None = None
    shuffle: bool = True


@dataclass
class RolloutSection:
    mode: Literal["delayed", "coupled"] = "delayed"
    group_size: int = 8
    max_turns: int = 5
    max_response_tokens: int = 8000
    max_tokens_per_turn: int | None = None
    max_observation_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    instruction: str | None = None  # None: the protocol's default prompt
    execute_token: str = "<tool_call>"
    enable_thinking: bool = False
    exec_timeout_s: float = 5.0
    sandbox_workers: int = 4
    sandbox_memory_mb: int = 1024
    sandbox_isolation: Literal["auto", "bwrap", "none"] = "auto"
    straggler_wait_s: float | None = None  # None: deterministic rounds (see RolloutConfig)


@dataclass
class AlgoConfig:
    lam: float = 1e-3  # IH surrogate weight; 0 = GRPO on the same protocol, 1 = EH-GRPO
    c_mask: Literal["all", "decision"] = "all"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float = 3.0
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    norm_constant: float | None = None  # Dr.GRPO's constant (default: max_response_tokens)
    advantage: Literal["grpo", "drgrpo"] = "grpo"  # drgrpo: no division by the group std
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    dynamic_sampling: bool = True  # drop groups whose rewards are all equal (DAPO)
    oversample: float = 3.0  # at most this many times prompts_per_step are rolled out per step
    mask_void: bool = False  # drop void trajectories from the gradient (their reward still counts)
    mask_truncated: bool = False  # drop truncated trajectories from the gradient
    reward: Literal["math_verify", "exact"] = "math_verify"
    reward_timeout_s: float = 5.0


@dataclass
class OptimConfig:
    lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    warmup_steps: int = 0  # 0: constant learning rate
    updates_per_step: int = 1  # optimizer steps per RL step (mini-batches)
    micro_batch_size: int = 8  # trajectories per forward/backward (gradient accumulation)
    loss_chunk_size: int = 1024  # tokens per chunk of the memory-efficient output layer


@dataclass
class LogConfig:
    tensorboard: bool = True  # when the tensorboard package is installed
    wandb: bool = False
    wandb_project: str = "ihgrpo"
    progress: bool = True
    sample_every: int = 0  # write rollouts.jsonl samples every N steps (0: never)
    # log diag/q_kl_at_E and diag/e_share_at_E (ihgrpo.diagnostics): two extra no-grad forwards a step
    update_diagnostics: bool = False


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    prompts_per_step: int = 16
    output_dir: str = "runs/ihgrpo"
    max_steps: int = 100
    save_every: int = 50
    seed: int = 0
    resume: bool = False


# ----------------------------------------------------------------------------- loading
def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks (and gently converts) a value against a dataclass field type."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: must be one of {', '.join(map(repr, get_args(tp)))}, got {value!r}")
        return value
    if origin is tuple:
        args = get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            close = [n for n in names if n.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {full!r}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _apply(current, value, full + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], full))


SECTIONS = ("model", "data", "rollout", "algo", "optim", "log")


def _override(cfg: TrainConfig, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    data: Any = value
    for part in reversed(parts):
        data = {part: data}
    _apply(cfg, data)


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a packaged config (`qwen3-1.7b`, `cpu-tiny`, ...)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"no config {name_or_path!r}: not a file, nor a packaged config ({', '.join(names)})")


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    cfg = TrainConfig()
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        _apply(cfg, data)
    for item in overrides:
        _override(cfg, item)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    checks = [
        (cfg.rollout.group_size >= 2, "rollout.group_size: GRPO needs at least 2 rollouts per prompt"),
        (cfg.prompts_per_step >= 1, "prompts_per_step: must be >= 1"),
        (cfg.max_steps >= 0, "max_steps: must be >= 0"),
        (cfg.save_every >= 1, "save_every: must be >= 1"),
        (cfg.rollout.max_turns >= 1, "rollout.max_turns: must be >= 1"),
        (cfg.rollout.temperature > 0, "rollout.temperature: must be > 0 for RL sampling"),
        (0 < cfg.rollout.top_p <= 1, "rollout.top_p: must be in (0, 1]"),
        (cfg.algo.oversample >= 1, "algo.oversample: must be >= 1"),
        (0 <= cfg.algo.clip_low < 1 and cfg.algo.clip_high >= 0, "algo.clip_low/clip_high: bad range"),
        (cfg.algo.dual_clip > 1, "algo.dual_clip: must be > 1"),
        (cfg.algo.lam >= 0, "algo.lam: must be >= 0"),
        (cfg.optim.lr > 0, "optim.lr: must be > 0"),
        (cfg.optim.micro_batch_size >= 1, "optim.micro_batch_size: must be >= 1"),
        (cfg.optim.updates_per_step >= 1, "optim.updates_per_step: must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    data = to_dict(cfg)
    data["optim"]["betas"] = list(cfg.optim.betas)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
