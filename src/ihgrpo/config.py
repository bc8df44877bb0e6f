"""Typed configuration: dataclasses <- YAML file <- `key=value` overrides.

    cfg = load_config("configs/qwen3-1.7b.yaml", ["algo.lam=0", "max_steps=10"])
    ecfg = load_eval_config(None, ["rollout.top_p=0.9", "eval.k=4"])   # `ihgrpo eval`

Unknown keys and bad values raise ConfigError, whose one-line message names the key; the CLI
turns it into exit status 2. The standard keys are top-level: `max_steps`, `save_every`,
`seed`, `output_dir`, `resume`; the rest live in sections (`algo.lam=0`, `rollout.max_turns=4`).
Training (:class:`TrainConfig`) and evaluation (:class:`EvalConfig`) share the `model` and
`rollout` sections (the rollout section also holds the sandbox settings).

An override's value is read as YAML (`[0.8, 0.9]`, `true`, `1e-3`), except that a text field
takes the text as written (`rollout.instruction=Answer: \\boxed{}`) and an optional field takes
`none` or `null` as None.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
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
    # parquet / JSONL path, a Hugging Face dataset name, or "demo"; or a list of them (concatenated)
    train: str | list[str] = ""
    question_key: str = "question"  # for JSONL / HF datasets (verl parquet is detected)
    answer_key: str = "answer"
    split: str = "train"  # for Hugging Face datasets
    max_examples: int | None = None  # per source
    shuffle: bool = True


@dataclass
class RolloutSection:
    mode: Literal["delayed", "coupled"] = "delayed"
    group_size: int = 8
    max_turns: int = 5
    max_response_tokens: int = 8000  # model + observation tokens after the prompt
    max_tokens_per_turn: int | None = None  # generated tokens per turn (None: up to the response budget)
    max_context_tokens: int | None = None  # prompt + response + observations (None: no limit of its own)
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
    # Rows (trajectories) per generate call: bounds the rollout's KV cache (rows x tokens); a step
    # still rolls out every trajectory, in chunks. None: all of a round's live trajectories at once.
    max_batch_rows: int | None = None
    # hf: the trainer's module; vllm: a vLLM engine (pip install 'ihgrpo[vllm]'); auto: vllm when it is
    # installed and a GPU is present, else hf
    backend: Literal["hf", "vllm", "auto"] = "hf"
    vllm_gpu_memory_utilization: float = 0.3  # the engine's share of the GPU (weights + KV cache)
    vllm_max_model_len: int | None = None  # None: the model's context length
    vllm_sleep_level: int = 2  # during the update: 2 frees weights and KV cache, 1 keeps weights on CPU, 0 never

    # The one place that turns the section into the engine's objects (callers copy no fields).
    def rollout_config(self):
        """The engine's RolloutConfig (a ValueError for a value the engine rejects)."""
        from ihgrpo.rollout import RolloutConfig

        return RolloutConfig(
            mode=self.mode, max_turns=self.max_turns, max_response_tokens=self.max_response_tokens,
            max_tokens_per_turn=self.max_tokens_per_turn, max_observation_tokens=self.max_observation_tokens,
            max_context_tokens=self.max_context_tokens,
            exec_timeout_s=self.exec_timeout_s, straggler_wait_s=self.straggler_wait_s,
            execute_token=self.execute_token, instruction=self.instruction, enable_thinking=self.enable_thinking,
            max_batch_rows=self.max_batch_rows)

    def sampling_params(self, **changes):
        """SamplingParams of one turn (temperature, top_p, top_k, the per-turn budget) with ``changes``."""
        from ihgrpo.rollout import SamplingParams

        kw = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                  max_new_tokens=self.max_tokens_per_turn or self.max_response_tokens)
        kw.update(changes)
        return SamplingParams(**kw)

    def sandbox_pool(self):
        """A SandboxPool with this section's workers, timeout, memory cap and isolation."""
        from ihgrpo.sandbox import SandboxPool

        return SandboxPool(max_workers=self.sandbox_workers, timeout_s=self.exec_timeout_s,
                           memory_mb=self.sandbox_memory_mb, isolation=self.sandbox_isolation)


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
    min_valid: int = 0  # drop groups with fewer non-truncated rollouts (the release's min_n); 0: off
    reward: Literal["math_verify", "exact"] = "math_verify"
    reward_timeout_s: float = 5.0
    # importance sampling against the generator's log-probs: tis multiplies each token's loss by
    # min(exp(logp_old - logp_rollout), rollout_is_cap); the mismatch is logged every step either way
    rollout_is: Literal["none", "tis"] = "none"
    rollout_is_cap: float = 2.0


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
class LoraSection:
    """LoRA adapters through PEFT (`pip install 'ihgrpo[lora]'`): only the adapters train and
    are saved in checkpoints; the KL reference (if any) is the base with the adapters off."""

    r: int = 0  # adapter rank; 0: off (full fine-tuning)
    alpha: float = 16.0  # scaling: the adapter's update is multiplied by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input (0: the rollout and the loss see the same policy)
    # module names (q_proj,v_proj) or all-linear: every linear layer of the blocks, not the output layer
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class DistributedSection:
    """How the policy is spread over the processes that `accelerate launch` / `torchrun` start."""

    strategy: Literal["ddp", "fsdp"] = "ddp"  # ddp: a full copy per process; fsdp: FSDP2, weights/grads/optimizer sharded
    reshard_after_forward: bool = True  # fsdp: free each block's gathered weights after its forward (ZeRO-3); false: faster, more memory
    cpu_offload: bool = False  # fsdp: keep the shards, gradients and optimizer state in CPU memory (slow; for memory)
    wrap_class: str | None = None  # fsdp: the block class sharded as one unit (default: the model's, e.g. Qwen3DecoderLayer)
    mixed_precision: bool = True  # fsdp under bf16 autocast: gather bf16 copies of the fp32 shards, reduce grads in fp32


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    lora: LoraSection = field(default_factory=LoraSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    prompts_per_step: int = 16
    output_dir: str = "runs/ihgrpo"
    max_steps: int = 100
    save_every: int = 50
    seed: int = 0
    resume: bool = False
    # Before the first step, refuse (exit 2) when the memory estimate exceeds the GPU's free memory.
    check_memory: bool = True


@dataclass
class EvalSection:
    k: int | None = None  # samples per problem; None: per benchmark (8, or 32 for aime24/25, amc23, hmmt25)
    limit: int | None = None  # only the first N problems of each benchmark
    batch_size: int = 32  # trajectories per generation batch
    data_dir: str = "../shared/data/math"  # where the paper's benchmark files are
    device: str = "auto"  # auto: cuda when available
    reward_timeout_s: float = 5.0
    viewer_samples: int = 4  # trajectories per benchmark in rollouts.html


def _eval_rollout() -> RolloutSection:
    return RolloutSection(top_p=0.7, backend="auto", vllm_gpu_memory_utilization=0.9)


@dataclass
class EvalConfig:
    """`ihgrpo eval`: the model and rollout sections of training, plus `eval:`.

    Defaults that differ from training: ``rollout.top_p`` 0.7 (the paper's evaluation; the
    release's configured value, which its own evaluation silently dropped); ``rollout.backend``
    auto (vLLM when installed and a GPU is present) with ``rollout.vllm_gpu_memory_utilization`` 0.9
    (the engine has the GPU to itself). ``rollout.group_size``
    is unused (``eval.k`` is the number of samples per problem). ``model.dtype: auto`` is
    bfloat16 on a GPU, float32 on CPU.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutSection = field(default_factory=_eval_rollout)
    eval: EvalSection = field(default_factory=EvalSection)
    seed: int = 0


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
    if origin is list:
        if isinstance(value, str):  # key=a,b on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, get_args(tp)[0], key) for v in value]
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


SECTIONS = ("model", "data", "rollout", "algo", "optim", "log", "lora", "distributed")


def _field_type(cfg: Any, parts: list[str]) -> Any:
    """The type of the leaf field `parts` names, or None (not a leaf: `_apply` says why)."""
    obj = cfg
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return None
        if i == len(parts) - 1:
            return None if dataclasses.is_dataclass(getattr(obj, part)) else _hints(type(obj))[part]
        obj = getattr(obj, part)
    return None


def _parse_value(tp: Any, raw: str) -> Any:
    args = get_args(tp) if get_origin(tp) in (typing.Union, types.UnionType) else ()
    if type(None) in args and raw.strip().lower() in ("none", "null", "~"):
        return None
    listed = any(get_origin(a) is list for a in args) and raw.strip().startswith("[")
    if (tp is str or (args and str in args)) and not listed:
        return raw  # text as written (YAML would read "a: b" as a mapping and strip quotes)
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _override(cfg: Any, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    _apply_dotted(cfg, {key: _parse_value(_field_type(cfg, key.split(".")), raw)})


def _apply_dotted(cfg: Any, values: dict[str, Any]) -> None:
    """Applies {"rollout.max_turns": 4, ...} (typed values, checked like a YAML file's)."""
    for key, value in values.items():
        data: Any = value
        for part in reversed(key.split(".")):
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


def _load(cfg: Any, name_or_path: str | None, overrides, defaults: dict[str, Any] | None = None) -> Any:
    """Layers, lowest first: the dataclass defaults, `defaults` (e.g. a benchmark's own), the
    YAML file, the `key=value` overrides."""
    if defaults:
        _apply_dotted(cfg, defaults)
    if name_or_path:
        path = resolve_config_path(name_or_path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        _apply(cfg, data)
    for item in overrides:
        _override(cfg, item)
    return cfg


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    cfg = _load(TrainConfig(), name_or_path, overrides)
    validate(cfg)
    return cfg


def _rollout_checks(r: RolloutSection) -> list[tuple[bool, str]]:
    """Checks of the rollout section that training and evaluation share."""
    return [
        (r.max_turns >= 1, f"rollout.max_turns: must be >= 1, got {r.max_turns}"),
        (0 < r.top_p <= 1, f"rollout.top_p: must be in (0, 1], got {r.top_p}"),
        (r.top_k >= 0, f"rollout.top_k: must be >= 0, got {r.top_k}"),
        (r.max_response_tokens >= 1, f"rollout.max_response_tokens: must be >= 1, got {r.max_response_tokens}"),
        (r.max_tokens_per_turn is None or r.max_tokens_per_turn >= 1,
         f"rollout.max_tokens_per_turn: must be >= 1 (or none), got {r.max_tokens_per_turn}"),
        (r.max_context_tokens is None or r.max_context_tokens >= 1,
         f"rollout.max_context_tokens: must be >= 1 (or none), got {r.max_context_tokens}"),
        (r.max_observation_tokens >= 1,
         f"rollout.max_observation_tokens: must be >= 1, got {r.max_observation_tokens}"),
        (r.exec_timeout_s > 0, f"rollout.exec_timeout_s: must be > 0, got {r.exec_timeout_s}"),
        (r.sandbox_workers >= 1, f"rollout.sandbox_workers: must be >= 1, got {r.sandbox_workers}"),
        (r.max_batch_rows is None or r.max_batch_rows >= 1,
         f"rollout.max_batch_rows: must be >= 1 (or none), got {r.max_batch_rows}"),
        (0 < r.vllm_gpu_memory_utilization <= 1,
         f"rollout.vllm_gpu_memory_utilization: must be in (0, 1], got {r.vllm_gpu_memory_utilization}"),
        (r.vllm_sleep_level in (0, 1, 2), f"rollout.vllm_sleep_level: must be 0, 1 or 2, got {r.vllm_sleep_level}"),
    ]


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def validate(cfg: TrainConfig) -> None:
    _check([
        (cfg.rollout.group_size >= 2, "rollout.group_size: GRPO needs at least 2 rollouts per prompt"),
        (cfg.prompts_per_step >= 1, "prompts_per_step: must be >= 1"),
        (cfg.max_steps >= 0, "max_steps: must be >= 0"),
        (cfg.save_every >= 1, "save_every: must be >= 1"),
        (cfg.rollout.temperature > 0, "rollout.temperature: must be > 0 for RL sampling"),
        *_rollout_checks(cfg.rollout),
        (cfg.algo.oversample >= 1, "algo.oversample: must be >= 1"),
        (0 <= cfg.algo.min_valid <= cfg.rollout.group_size,
         f"algo.min_valid: must be in [0, rollout.group_size={cfg.rollout.group_size}] (a group needs that many "
         f"non-truncated rollouts), got {cfg.algo.min_valid}; lower it (0 = off) with the group size"),
        (0 <= cfg.algo.clip_low < 1 and cfg.algo.clip_high >= 0, "algo.clip_low/clip_high: bad range"),
        (cfg.algo.dual_clip > 1, "algo.dual_clip: must be > 1"),
        (cfg.algo.lam >= 0, "algo.lam: must be >= 0"),
        (cfg.algo.rollout_is_cap >= 1, "algo.rollout_is_cap: must be >= 1 (a cap below 1 down-weights every token)"),
        (cfg.optim.lr > 0, "optim.lr: must be > 0"),
        (cfg.optim.micro_batch_size >= 1, "optim.micro_batch_size: must be >= 1"),
        (cfg.optim.updates_per_step >= 1, "optim.updates_per_step: must be >= 1"),
        (cfg.lora.r >= 0, "lora.r: must be >= 0 (0 = no LoRA)"),
        (cfg.lora.alpha > 0, "lora.alpha: must be > 0"),
        (0 <= cfg.lora.dropout < 1, "lora.dropout: must be in [0, 1)"),
        (bool(cfg.lora.target_modules), "lora.target_modules: name at least one module, or all-linear"),
        (not (cfg.distributed.strategy == "fsdp" and cfg.rollout.backend != "hf"),
         "distributed.strategy=fsdp samples with the hf backend only (vLLM's weight sync needs whole weights): "
         "set rollout.backend=hf, or use ddp"),
    ])


# ----------------------------------------------------------------------------- evaluation
# `ihgrpo eval` also takes a setting by its bare name (`temperature=0.6`, `k=4`): the field of
# that name in eval, rollout or model; `model` is model.path and `protocol` rollout.mode.
_EVAL_ALIASES = {"batch": "batch_size", "workers": "sandbox_workers", "mode": "protocol", "model_path": "model"}


def _eval_keys() -> dict[str, str]:
    keys = {"model": "model.path", "protocol": "rollout.mode", "seed": "seed"}
    for section, cls in (("model", ModelConfig), ("rollout", RolloutSection), ("eval", EvalSection)):
        for f in dataclasses.fields(cls):
            keys.setdefault(f.name, f"{section}.{f.name}")
    keys.pop("path")
    return keys


EVAL_KEYS = _eval_keys()


def eval_key(key: str) -> str:
    """The dotted key of an evaluation setting given by its dotted or bare name."""
    key = key.strip()
    if "." in key:
        return key
    key = key.replace("-", "_")
    if key in _EVAL_ALIASES:
        new = _EVAL_ALIASES[key]
        warnings.warn(f"ihgrpo eval: the setting name {key!r} is deprecated; use {new!r}", FutureWarning,
                      stacklevel=3)
        key = new
    if key not in EVAL_KEYS:
        close = [n for n in EVAL_KEYS if n.startswith(key[:3])]
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    return EVAL_KEYS[key]


def load_eval_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = (), *,
                     defaults: dict[str, Any] | None = None) -> EvalConfig:
    """An EvalConfig: the dataclass defaults <- `defaults` (a benchmark's own, dotted keys) <- the
    YAML file <- the `key=value` overrides (dotted or bare names)."""
    items = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        items.append(f"{eval_key(key)}={raw}")
    cfg = _load(EvalConfig(), name_or_path, items, defaults)
    cfg.sources = (name_or_path, tuple(items))  # type: ignore[attr-defined]
    validate_eval(cfg)
    return cfg


def with_defaults(cfg: EvalConfig, defaults: dict[str, Any]) -> EvalConfig:
    """`cfg` with a benchmark's `defaults` as a layer under the user's settings. A config built in
    code (not by :func:`load_eval_config`) has no recorded layers: it is used as it is."""
    sources = getattr(cfg, "sources", None)
    if not defaults or sources is None:
        return cfg
    return load_eval_config(sources[0], sources[1], defaults=defaults)


def validate_eval(cfg: EvalConfig) -> None:
    e, r = cfg.eval, cfg.rollout
    _check([
        (r.temperature >= 0, f"rollout.temperature: must be >= 0, got {r.temperature}"),
        *_rollout_checks(r),
        (e.k is None or e.k >= 1, f"eval.k: must be >= 1, got {e.k}"),
        (e.limit is None or e.limit >= 1, f"eval.limit: must be >= 1, got {e.limit}"),
        (e.batch_size >= 1, f"eval.batch_size: must be >= 1, got {e.batch_size}"),
        (e.reward_timeout_s > 0, f"eval.reward_timeout_s: must be > 0, got {e.reward_timeout_s}"),
        (e.viewer_samples >= 0, f"eval.viewer_samples: must be >= 0, got {e.viewer_samples}"),
    ])


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    data = to_dict(cfg)
    data["optim"]["betas"] = list(cfg.optim.betas)
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
