"""Running an evaluation: the fixed batch grid, generation and scoring, resume from the ledger.

The only module of :mod:`ihgrpo.eval` that needs torch (imported when a batch is generated).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from ihgrpo.config import EVAL_KEYS, EvalConfig, validate_eval, with_defaults
from ihgrpo.protocol import TurnEnd, build_prompt, extract_boxed, is_void
from ihgrpo.utils import atomic_write_text

from .benchmarks import Benchmark, EvalError, resolve_benchmarks
from .choice import MC_INSTRUCTION, choice_letter, choice_prompt
from .ledger import LEDGER, SampleLedger
from .metrics import benchmark_metrics, sample_stats
from .parallel import EvalWorld, merge_shards, shard_path
from .progress import EvalProgress

__all__ = ["run_eval", "sample_seed", "bench_config", "flat_settings"]

# The settings as results.json lists them (bare names, as `ihgrpo eval` takes them).
_FLAT = ("model", "protocol", "k", "limit", "temperature", "top_p", "top_k", "max_turns", "max_response_tokens",
         "max_tokens_per_turn", "max_context_tokens", "max_observation_tokens", "exec_timeout_s", "batch_size",
         "seed", "data_dir", "sandbox_workers", "sandbox_memory_mb", "sandbox_isolation", "reward_timeout_s", "dtype",
         "device", "instruction", "execute_token", "enable_thinking", "viewer_samples", "backend")


def flat_settings(cfg: EvalConfig) -> dict:
    """The settings by bare name ({"temperature": 1.0, "k": None, ...})."""
    out = {}
    for name in _FLAT:
        value: Any = cfg
        for part in EVAL_KEYS[name].split("."):
            value = getattr(value, part)
        out[name] = value
    return out


def sample_seed(seed: int, benchmark: str, problem: int, sample: int) -> int:
    """The random-stream key of one sample: a function of these four values only."""
    digest = hashlib.sha256(f"ihgrpo-eval/{seed}/{benchmark}/{problem}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def bench_config(cfg: EvalConfig, bench: Benchmark) -> EvalConfig:
    """The settings of one benchmark: its own defaults under the user's; multiple choice has no
    tools (one generation, the plain prompt)."""
    out = with_defaults(cfg, bench.defaults)
    if bench.domain == "choice":
        out = dataclasses.replace(out, rollout=dataclasses.replace(
            out.rollout, mode="delayed", max_turns=1, instruction=MC_INSTRUCTION, max_tokens_per_turn=None))
    return out


def _rollout_settings(bench: Benchmark, bcfg: EvalConfig) -> dict:
    r = bcfg.rollout
    out = {"protocol": "none" if bench.domain == "choice" else r.mode, "max_turns": r.max_turns,
           "max_response_tokens": r.max_response_tokens, "max_tokens_per_turn": r.max_tokens_per_turn,
           "max_observation_tokens": r.max_observation_tokens, "exec_timeout_s": r.exec_timeout_s,
           "instruction": r.instruction, "execute_token": r.execute_token, "enable_thinking": r.enable_thinking}
    if r.max_context_tokens is not None:  # only when set: ledgers written before it still resume
        out["max_context_tokens"] = r.max_context_tokens
    return out


def _model_id(path: str) -> str:
    return os.path.abspath(path) if path and os.path.exists(path) else path


def _fingerprint(bench: Benchmark, bcfg: EvalConfig) -> tuple[str, dict]:
    """What a sample depends on (besides its question): the model and the sampling settings."""
    r = bcfg.rollout
    sampling = {"model": _model_id(bcfg.model.path), "dtype": bcfg.model.dtype, "temperature": r.temperature,
                "top_p": r.top_p, "top_k": r.top_k, "seed": bcfg.seed, "domain": bench.domain,
                **_rollout_settings(bench, bcfg)}
    blob = json.dumps(sampling, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], sampling


def _check_ledger(ledger: SampleLedger, benches: list[Benchmark], prints: dict, known: dict, out: Path) -> None:
    """prints: benchmark name -> (fingerprint, sampling settings); known: eval_settings.json as read."""
    for b in benches:
        fp, sampling = prints[b.name]
        for rec in ledger.for_benchmark(b.name):
            p = rec["problem"]
            if rec.get("fingerprint") != fp:
                old = known.get(rec.get("fingerprint"), {})
                diff = [f"{key}: {old.get(key)!r} -> {sampling.get(key)!r}" for key in sampling
                        if old and old.get(key) != sampling.get(key)]
                raise EvalError(f"{out / LEDGER} holds {b.name} samples made with other settings"
                                f"{' (' + '; '.join(diff)[:300] + ')' if diff else ''}; use another --out, "
                                f"or the same settings to resume")
            if p < len(b.problems) and (rec.get("question") != b.problems[p].question
                                        or rec.get("gold") != b.problems[p].gold):
                raise EvalError(f"{out / LEDGER}: {b.name} problem {p} is not the question of {b.source}; "
                                f"use another --out for another data file")


def _plan(bench: Benchmark, ledger: SampleLedger, batch_size: int) -> list[list[tuple[int, int]]]:
    """The missing (problem, sample) pairs, in batches of the fixed grid."""
    pairs = [(p, s) for p in range(len(bench.problems)) for s in range(bench.k)]
    batches = []
    for start in range(0, len(pairs), batch_size):
        missing = [ps for ps in pairs[start:start + batch_size] if (bench.name, *ps) not in ledger]
        if missing:
            batches.append(missing)
    return batches


class _Runner:
    """The model, generator, sandbox pool and verifier of one run (built only when needed)."""

    def __init__(self, cfg: EvalConfig, bcfgs: dict[str, EvalConfig], model, tokenizer, echo,
                 domains: dict[str, str], world: EvalWorld | None = None):
        import torch

        from ihgrpo import registry
        from ihgrpo.models import checkpoint_model_dir, eos_token_ids, is_adapter_dir, load_model_and_tokenizer
        from ihgrpo.rollout.backends import resolve_backend
        from ihgrpo.rollout.hf import HFGenerator
        from ihgrpo.vocab import add_protocol_tokens

        self.cfg, self.bcfgs = cfg, bcfgs
        self.world = world or EvalWorld()
        e, m = cfg.eval, cfg.model
        self.backend = resolve_backend(cfg.rollout.backend)
        device = e.device if e.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = m.dtype if m.dtype != "auto" else ("bfloat16" if device.startswith("cuda") else "float32")
        self.generator = self._workdir = None
        # E must be one token under the delayed protocol: added below where the vocabulary lacks it
        self._exec_tokens = sorted({c.rollout.execute_token for name, c in bcfgs.items()
                                    if c.rollout.mode == "delayed" and domains.get(name) == "math"})
        if self.backend == "vllm" and model is None and registry.lookup("model", m.path) is None:
            path = checkpoint_model_dir(m.path)  # a training checkpoint: its model/
            # vLLM reads a full model's weights itself; a LoRA adapter is loaded and merged here
            # (below), then goes to an engine on the base's config through sync_weights.
            if not is_adapter_dir(path):
                model, tokenizer = self._launch_vllm(path, dtype, echo)
            else:
                from ihgrpo.rollout.vllm import import_vllm

                import_vllm()  # vLLM missing: say so before loading the weights
        if model is None:
            t0 = time.perf_counter()
            model, tokenizer = load_model_and_tokenizer(m.path, dtype=dtype, trust_remote_code=m.trust_remote_code,
                                                        attn_implementation=m.attn_implementation)
            echo(f"loaded {m.path} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
                 f"{dtype}, {device}) in {time.perf_counter() - t0:.1f} s")
        elif tokenizer is None:
            raise EvalError("a tokenizer is needed with a model object")
        for token in self._exec_tokens:
            add_protocol_tokens(model, tokenizer, token)
        self.tokenizer = tokenizer
        self.eos = eos_token_ids(model, tokenizer)
        if not self.eos:
            raise EvalError(f"{m.path}: neither the model nor the tokenizer names an EOS token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        if self.backend == "hf":  # data-parallel: this rank's own GPU
            self.generator = HFGenerator(model, tokenizer, device=self.world.device(device), pad_token_id=pad,
                                         seed=cfg.seed)
        elif self.generator is None:  # a model object: an engine on its config, then its weights
            import tempfile

            from ihgrpo.rollout.vllm import VLLMGenerator

            self._workdir = tempfile.TemporaryDirectory(prefix="ihgrpo-vllm-")
            self.generator = VLLMGenerator.for_model(model, tokenizer, self._workdir.name, **self._vllm_options(dtype))
            self.generator.sync_weights(model)
        self.device, self.dtype = device, dtype
        self.pool = None
        self.verifier = None
        self.engines: dict[str, Any] = {}

    def _vllm_options(self, dtype: str) -> dict:
        from ihgrpo.rollout.backends import vllm_options

        return vllm_options(self.cfg.rollout, dtype=dtype, seed=self.cfg.seed,
                            trust_remote_code=self.cfg.model.trust_remote_code, rank=self.world.rank,
                            world=self.world.world)

    def _launch_vllm(self, path: str, dtype: str, echo):
        """A vLLM engine on the model directory or name `path`; returns (a stand-in carrying the generation config,
        the tokenizer): only those are loaded here."""
        import types

        from ihgrpo.models import load_tokenizer_and_generation_config
        from ihgrpo.rollout.vllm import VLLMGenerator, import_vllm
        from ihgrpo.vocab import single_token_id

        import_vllm()  # a one-line error naming the extra before anything is loaded
        tokenizer, generation_config = load_tokenizer_and_generation_config(
            path, trust_remote_code=self.cfg.model.trust_remote_code)
        missing = [t for t in self._exec_tokens if single_token_id(tokenizer, t) is None]
        if missing:  # the engine's vocabulary comes from the folder: it cannot grow here
            raise EvalError(f"{path}: the tokenizer has no {missing[0]!r} token, which the delayed protocol needs, "
                            f"and the vLLM backend reads the model from the folder as it is; use --backend hf "
                            f"(the token is added in memory), a checkpoint of `ihgrpo train`, or --protocol coupled")
        t0 = time.perf_counter()
        self.generator = VLLMGenerator.launch(path, **self._vllm_options(dtype))
        echo(f"started vLLM on {path} ({dtype}) in {time.perf_counter() - t0:.1f} s")
        return types.SimpleNamespace(generation_config=generation_config), tokenizer

    def engine(self, bench: Benchmark):
        from ihgrpo.rollout import RolloutEngine

        if bench.name not in self.engines:
            try:
                rcfg = self.bcfgs[bench.name].rollout.rollout_config()
                engine = RolloutEngine(self.generator, self.tokenizer, None, rcfg, eos_token_ids=self.eos,
                                       require_execute_token=bench.domain == "math" and rcfg.mode == "delayed")
            except ValueError as exc:  # e.g. an execute token the tokenizer splits
                raise EvalError(f"{bench.name}: {' '.join(str(exc).split())}") from None
            if bench.domain == "math" and self.pool is None:
                self.pool = self.cfg.rollout.sandbox_pool()
            engine.pool = self.pool
            self.engines[bench.name] = engine
        return self.engines[bench.name]

    def rewards(self, answers: list[str | None], golds: list[str]) -> list[float]:
        if self.verifier is None:
            from ihgrpo.rewards import RewardVerifier

            self.verifier = RewardVerifier(timeout_s=self.cfg.eval.reward_timeout_s)
        return self.verifier.verify_batch(answers, golds)

    def run_batch(self, bench: Benchmark, pairs: list[tuple[int, int]]) -> list:
        """Trajectories of the given (problem, sample) pairs, scored, in order. Each has its own
        random stream (its seed), so its tokens do not depend on the batch."""
        from ihgrpo.rollout import Trajectory

        engine = self.engine(bench)
        cfg = engine.config
        trajs = []
        prompts: dict[int, list[int]] = {}
        for p, k in pairs:
            if p not in prompts:
                problem = bench.problems[p]
                content = (choice_prompt(problem) if bench.domain == "choice" else
                           build_prompt(problem.question, cfg.mode, instruction=cfg.instruction,
                                        execute_token=cfg.execute_token))
                prompts[p] = engine.chat.prompt_ids(content)
            trajs.append(Trajectory(uid=f"{bench.name}-p{p}-s{k}", prompt_index=p, sample_index=k,
                                    prompt_ids=list(prompts[p]), seed=sample_seed(self.cfg.seed, bench.name, p, k)))
        params = self.bcfgs[bench.name].rollout.sampling_params()
        if bench.domain == "choice":
            self._plain(engine, trajs, params)
            for t in trajs:
                opts = bench.problems[t.prompt_index].options
                t.meta["choice"] = choice_letter(t.answer, opts)
                t.reward = float(t.meta["choice"] == bench.problems[t.prompt_index].gold)
        else:
            engine.run(trajs, params)
            rewards = self.rewards([t.answer for t in trajs], [bench.problems[t.prompt_index].gold for t in trajs])
            for t, r in zip(trajs, rewards):
                t.reward = float(r)
        return trajs

    def _plain(self, engine, trajs, params) -> None:
        """No tools: one generation per sample, stopped by EOS or the response budget."""
        from ihgrpo.rollout import TurnRecord, derive_seed

        budget = engine.config.max_response_tokens
        sp = dataclasses.replace(params, max_new_tokens=budget, stop_token_ids=tuple(self.eos))
        outs = self.generator.generate([t.prompt_ids for t in trajs], sp, [budget] * len(trajs),
                                       request_ids=[t.uid for t in trajs],
                                       seeds=[derive_seed(t.seed, 0) for t in trajs])
        for t, o in zip(trajs, outs):
            ids = list(o.token_ids)
            t.response_ids, t.mask, t.logprobs = ids, [1] * len(ids), [float(x) for x in o.logprobs]
            end = TurnEnd.EOS if o.finish_reason == "stop_token" else TurnEnd.BUDGET
            t.turns.append(TurnRecord(text=engine.chat.decode(ids), end=end, n_tokens=len(ids)))
            t.finished, t.truncated = end is TurnEnd.EOS, end is not TurnEnd.EOS
            text = engine.chat.model_text(ids)
            t.answer = extract_boxed(text)
            t.void = is_void(text, t.finished)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.verifier is not None:
            self.verifier.close()
        if self._workdir is not None:
            self._workdir.cleanup()


def _record(bench: Benchmark, traj, fingerprint: str, full_text: str) -> dict:
    problem = bench.problems[traj.prompt_index]
    rec = {
        "benchmark": bench.name, "problem": traj.prompt_index, "sample": traj.sample_index,
        "question": problem.question, "gold": problem.gold, "answer": traj.answer,
        "correct": bool(traj.reward), "reward": float(traj.reward or 0.0), "text": full_text,
        "turns": [{"text": r.text, "end": r.end.value, "n_tokens": r.n_tokens, "code": r.code,
                   "blocks_run": r.blocks_run, "output": r.output, "ok": r.ok, "timed_out": r.timed_out}
                  for r in traj.turns],
        "stats": sample_stats(traj), "fingerprint": fingerprint,
    }
    if bench.domain == "choice":
        rec["options"] = dict(problem.options or ())
        rec["choice"] = traj.meta.get("choice")
    return rec


def run_eval(cfg: EvalConfig, out_dir: str | Path, *, benchmarks: list[str] | list[Benchmark],
             model=None, tokenizer=None, on_batch: Callable[[str, list[dict]], None] | None = None,
             echo: Callable[[str], None] | None = None, progress: bool = True) -> dict:
    """Evaluates, resuming from ``out_dir/samples.jsonl``; writes every output and returns the
    results (the content of results.json).

    ``cfg``: an :class:`~ihgrpo.config.EvalConfig` (from :func:`~ihgrpo.config.load_eval_config`,
    so that a benchmark's own defaults go under the user's settings). ``benchmarks``: specs
    (strings) or :class:`Benchmark` objects. ``model``/``tokenizer``: already loaded objects
    instead of ``cfg.model.path`` (which still names the model in the outputs).
    ``on_batch(benchmark, records)`` runs after each batch is durably in the ledger.
    ``progress``: show the progress on stderr while batches are generated (:mod:`.progress`).
    Under ``torchrun``/``accelerate launch`` each process evaluates its share (:mod:`.parallel`)
    and every process returns the results, which rank 0 writes.
    """
    from .report import write_outputs

    echo = echo or (lambda msg: print(msg, flush=True))
    validate_eval(cfg)
    out = Path(out_dir)
    world = EvalWorld.from_env()  # several processes under torchrun / accelerate launch
    try:
        results = _run_eval(cfg, out, benchmarks, model, tokenizer, on_batch, echo, progress, world, write_outputs)
        # every rank past the last collective before the group goes (only on success: a failed rank must
        # exit, not wait): a gloo group torn down while the peer still talks aborts the process at exit
        world.barrier()
        return results
    finally:
        world.close()


def _run_eval(cfg, out: Path, benchmarks, model, tokenizer, on_batch, echo, progress, world: EvalWorld,
              write_outputs) -> dict:
    main = world.rank == 0
    say = echo if main else (lambda msg: None)  # what every rank would say alike: rank 0 says it
    skipped: list[dict] = []
    if benchmarks and isinstance(benchmarks[0], Benchmark):
        benches = list(benchmarks)
        for b in benches:
            b.k = cfg.eval.k or b.k
    else:
        benches, skipped = resolve_benchmarks(list(benchmarks), cfg, say)
    bcfgs = {b.name: bench_config(cfg, b) for b in benches}
    order = {b.name: i for i, b in enumerate(benches)}
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if main:  # the only writer of samples.jsonl: repairs it, then takes in what a killed data-parallel run left
        ledger = SampleLedger(out / LEDGER).load()
        dropped = ledger.dropped
        merged = merge_shards(ledger, out, order)
    world.barrier()
    if not main:
        ledger = SampleLedger(out / LEDGER).load()  # clean now: nothing to rewrite
    if ledger.records:
        say(f"resuming: {len(ledger.records)} samples already in {out / LEDGER}"
            + (f" ({dropped} partial or duplicate lines dropped)" if main and dropped else "")
            + (f" ({merged} from the shards of a data-parallel run)" if main and merged else ""))
    known_path = out / "eval_settings.json"
    known = json.loads(known_path.read_text()) if known_path.exists() else {}
    prints = {b.name: _fingerprint(b, bcfgs[b.name]) for b in benches}
    _check_ledger(ledger, benches, prints, known, out)
    fingerprints = {}
    for name, (fp, sampling) in prints.items():
        known[fp] = sampling
        fingerprints[name] = fp
    if main:
        atomic_write_text(known_path, json.dumps(known, indent=2))

    plans = {b.name: _plan(b, ledger, cfg.eval.batch_size) for b in benches}
    todo = sum(len(pairs) for batches in plans.values() for pairs in batches)
    for b in benches:
        have = len(b.problems) * b.k - sum(len(x) for x in plans[b.name])
        say(f"{b.name}: {len(b.problems)} problems x k={b.k} ({b.domain}; {b.source}"
            + (f"; {b.selection})" if b.selection else ")")
            + (f", {have} samples done" if have else ""))
    # whole grid batches, dealt round-robin: each keeps the composition (and so the samples) of a 1-process run
    mine = world.share([(b, pairs) for b in benches for pairs in plans[b.name]])
    sink = ledger if world.world == 1 else SampleLedger(shard_path(out, world.rank))
    mine_todo = sum(len(pairs) for _, pairs in mine)
    if world.world > 1:
        say(f"data-parallel: {world.world} processes, {todo} samples to generate")
        echo = (lambda msg, _echo=echo, _tag=f"[rank {world.rank}] ": _echo(_tag + msg))
    runner = display = None
    t_start = time.perf_counter()
    generated = 0
    gen_time = 0.0
    try:
        if todo:  # on every rank when any has work: vLLM's per-rank engines start together
            runner = _Runner(cfg, bcfgs, model, tokenizer, echo if main else (lambda msg: None),
                             {b.name: b.domain for b in benches}, world)
            if progress and main and mine_todo:  # one display: rank 0's share
                display = EvalProgress(mine_todo)
                runner.generator.progress = display.on_generate
        for b, pairs in mine:
            if display is not None:
                display.start_batch(b.name)
            t0 = time.perf_counter()
            trajs = runner.run_batch(b, pairs)
            engine = runner.engine(b)
            records = [_record(b, t, fingerprints[b.name], engine.chat.decode(t.response_ids)) for t in trajs]
            sink.append(records)
            if display is not None:
                display.batch_done(len(records))
            dt = time.perf_counter() - t0
            gen_time += dt
            generated += len(records)
            probs = sorted({p for p, _ in pairs})
            acc = sum(r["correct"] for r in records) / len(records)
            echo(f"  {b.name}: problems {probs[0]}-{probs[-1]}, {len(records)} samples, "
                 f"accuracy {acc:.3f}, {dt:.1f} s ({generated}/{mine_todo})")
            if on_batch is not None:
                on_batch(b.name, records)
    finally:
        if display is not None:
            display.close()
        if runner is not None:
            runner.close()
    timing = world.gather((generated, gen_time))
    results = None
    if main:
        if world.world > 1:
            merge_shards(ledger, out, order)
        results = _results(benches, ledger, cfg, bcfgs, skipped, runner)
        results["timing"] = {"wall_s": time.perf_counter() - t_start,
                             "generation_s": sum(t for _, t in timing),
                             "samples_generated": sum(n for n, _ in timing)}
        if world.world > 1:
            results["timing"]["processes"] = world.world
        write_outputs(out, results, benches, ledger, cfg, echo)
    return world.broadcast(results)


def _results(benches: list[Benchmark], ledger: SampleLedger, cfg: EvalConfig, bcfgs: dict, skipped,
             runner) -> dict:
    per: dict[str, dict] = {}
    for b in benches:
        recs = [ledger.records[(b.name, p, k)] for p in range(len(b.problems)) for k in range(b.k)]
        m = benchmark_metrics(recs, len(b.problems), b.k)
        rollout = _rollout_settings(b, bcfgs[b.name])
        rollout["instruction"] = ("multiple-choice, no tools" if b.domain == "choice" else
                                  "default" if rollout["instruction"] is None else
                                  "custom" if rollout["instruction"] == cfg.rollout.instruction else b.name)
        per[b.name] = {**m, "domain": b.domain, "source": b.source, "rollout": rollout}
        if b.selection:
            per[b.name]["selection"] = b.selection
    avgs = [v["avg@k"] for v in per.values()]
    settings = flat_settings(cfg)
    settings["model"] = _model_id(cfg.model.path)
    settings["k"] = {b.name: b.k for b in benches}
    if runner is not None:
        settings["device"], settings["dtype"] = runner.device, runner.dtype
        settings["backend"] = runner.backend
    res = {"benchmarks": per, "mean_of_benchmarks": sum(avgs) / len(avgs) if avgs else 0.0}
    domains = sorted({b.domain for b in benches})
    if len(domains) > 1:
        res["mean_by_domain"] = {d: sum(v["avg@k"] for v in per.values() if v["domain"] == d)
                                 / sum(v["domain"] == d for v in per.values()) for d in domains}
    res["settings"] = settings
    if skipped:
        res["skipped"] = skipped
    return res
