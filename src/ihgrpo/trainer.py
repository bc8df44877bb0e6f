"""The GRPO loop, readable top to bottom (SPEC sections 3, 4 and 6).

One RL step:
  1. take prompts (oversampling when dynamic sampling drops groups),
  2. roll out G trajectories per prompt through the delayed (or coupled) protocol,
  3. reward each trajectory (math-verify) and compute group-relative advantages,
  4. drop groups whose rewards are all equal (DAPO dynamic sampling),
  5. update the policy with the IH-GRPO loss: micro-batches, gradient accumulation, grad clip,
  6. log metrics.jsonl, save a checkpoint every `save_every` steps (atomically).

Distribution goes through `accelerate`: each process rolls out its share of the prompts and the
loss is normalised by global counts, so N processes compute the same update as one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ihgrpo import registry
from ihgrpo.config import ConfigError, TrainConfig, dump_config
from ihgrpo.diagnostics import UpdateProbe, decoder_and_head
from ihgrpo.data import Example, PromptSampler, load_examples
from ihgrpo.dist import make_strategy
from ihgrpo.lora import apply_lora, require_peft
from ihgrpo.losses import chunked_token_stats, decision_c_mask, ih_grpo_loss_from_stats
from ihgrpo.models import ModelLoadError, eos_token_ids, load_model_and_tokenizer  # noqa: F401 (re-exported)
from ihgrpo.precision import precision_policy
from ihgrpo.rollout import RolloutEngine, Trajectory, batch_stats
from ihgrpo.rollout.backends import make_generator, vllm_options
from ihgrpo.rng import rng_state, seed_everything, set_rng_state
from ihgrpo.utils import fsync_dir
from ihgrpo.vocab import add_protocol_tokens, single_token_id

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- model
class PolicyStats(nn.Module):
    """Wraps a causal LM so that one forward returns log p(y), log p(E), z_E per token.

    The output layer runs in chunks (no [B, T, V] logits). Being a module, it goes through
    accelerate's DDP/FSDP wrapper, so gradient synchronisation works as usual.
    """

    def __init__(self, model: nn.Module, execute_token_id: int, chunk_size: int = 1024, temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.execute_token_id = execute_token_id
        self.chunk_size = chunk_size
        self.temperature = temperature

    def forward(self, input_ids, attention_mask, labels, compute_entropy: bool = False):
        base, head = decoder_and_head(self.model)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        stats = chunked_token_stats(hidden[:, :-1], head.weight, labels, self.execute_token_id,
                                    chunk_size=self.chunk_size, compute_entropy=compute_entropy,
                                    lm_head_bias=getattr(head, "bias", None), temperature=self.temperature)
        return stats


# ----------------------------------------------------------------------------- rewards
def make_reward_fn(kind: str, timeout_s: float):
    """answers, golds -> rewards in {0, 1}."""
    if kind == "exact":
        def exact(answers, golds):
            return [float(a is not None and _norm(a) == _norm(g)) for a, g in zip(answers, golds)]
        return exact, None
    from ihgrpo.rewards import RewardVerifier

    verifier = RewardVerifier(timeout_s=timeout_s)
    return (lambda answers, golds: verifier.verify_batch(answers, golds)), verifier


def _norm(s: str) -> str:
    return s.strip().replace(" ", "").rstrip(".").replace(",", "")


def group_advantages(rewards: list[float], group_size: int, *, std_normalize: bool = True) -> list[float]:
    """A_i = (R_i - mean(R_group)) / (std(R_group) + 1e-6); Dr.GRPO: no division by std."""
    out = []
    for g in range(0, len(rewards), group_size):
        r = torch.tensor(rewards[g:g + group_size], dtype=torch.float64)
        a = r - r.mean()
        if std_normalize:
            a = a / (r.std(unbiased=False) + 1e-6)
        out.extend(a.tolist())
    return out


# ----------------------------------------------------------------------------- batches
@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [B, L] prompt + response, right-padded
    attention_mask: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L-1] the next token at each position
    mask: torch.Tensor  # [B, L-1] 1 where the label was sampled by the policy (and kept)
    advantages: torch.Tensor  # [B]
    decision: torch.Tensor | None = None  # [B, L-1] the "decision" c-mask
    rollout_logprobs: torch.Tensor | None = None  # [B, L-1] the generator's log-probs of the labels


def collate(trajs: list[Trajectory], advantages: list[float], pad_id: int, keep: list[bool],
            execute_token_id: int, fence_close_ids: tuple[int, ...] = ()) -> TrainBatch:
    length = max(len(t.prompt_ids) + len(t.response_ids) for t in trajs)
    B = len(trajs)
    ids = torch.full((B, length), pad_id, dtype=torch.long)
    att = torch.zeros((B, length), dtype=torch.long)
    lmask = torch.zeros((B, length), dtype=torch.float32)
    rollout_lp = torch.zeros((B, length), dtype=torch.float32)
    for i, t in enumerate(trajs):
        seq = t.prompt_ids + t.response_ids
        ids[i, :len(seq)] = torch.tensor(seq)
        att[i, :len(seq)] = 1
        p = len(t.prompt_ids)
        rollout_lp[i, p:p + len(t.response_ids)] = torch.tensor(t.logprobs, dtype=torch.float32)
        if keep[i]:
            lmask[i, p:p + len(t.response_ids)] = torch.tensor(t.mask, dtype=torch.float32)
    labels = ids[:, 1:].clone()
    mask = lmask[:, 1:]
    decision = decision_c_mask(labels, mask, execute_token_id, fence_close_ids=fence_close_ids)
    return TrainBatch(ids, att, labels, mask, torch.tensor(advantages, dtype=torch.float32), decision,
                      rollout_lp[:, 1:])


# ----------------------------------------------------------------------------- trainer
class GRPOTrainer:
    """GRPO / IH-GRPO on a causal LM with code execution in the loop.

    >>> trainer = GRPOTrainer(load_config("configs/cpu-tiny.yaml", ["max_steps=2"]))
    >>> trainer.train()
    """

    def __init__(self, cfg: TrainConfig, *, model=None, tokenizer=None, examples: list[Example] | None = None,
                 reward_fn=None, eval_fn=None, eval_every: int = 0):
        """`model`/`tokenizer`/`examples` override what cfg names; `reward_fn(answers, golds) ->
        list[float]` replaces the configured reward (e.g. a custom verifier); `eval_fn(model) -> dict`
        runs every `eval_every` steps (and after the last), logged under "eval/"."""
        from accelerate import Accelerator

        self.cfg = cfg
        self.precision = precision_policy(cfg.model.dtype, "cuda" if torch.cuda.is_available() else "cpu")
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                                       mixed_precision=self.precision.mixed_precision)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        seed_everything(cfg.seed + self.rank)
        if cfg.lora.r:
            require_peft()  # before loading a model it could not train
        # What a LoRA checkpoint can name as its base: model.path, unless the model came from
        # the caller or a registered source (the demo); then the run keeps its own copy.
        from_path = model is None and registry.lookup("model", cfg.model.path) is None
        if model is None:  # a registered name (e.g. the demo's SFT start), a directory or a hub name
            model, tokenizer = load_model_and_tokenizer(
                cfg.model.path, dtype=self.precision.weights_name,
                trust_remote_code=cfg.model.trust_remote_code, attn_implementation=cfg.model.attn_implementation)
        if tokenizer is None:
            raise ConfigError("a tokenizer is required with a model object")
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if cfg.rollout.mode == "delayed":  # E must be one token: add it to a vocabulary without it
            if add_protocol_tokens(model, tokenizer, cfg.rollout.execute_token):
                from_path = False  # model.path lacks the new rows: LoRA checkpoints name the run's copy
        elif cfg.algo.lam != 0 and single_token_id(tokenizer, cfg.rollout.execute_token) is None:
            raise ConfigError(f"algo.lam: the IH surrogate reads the probability of the execute token, and the "
                              f"tokenizer has no {cfg.rollout.execute_token!r} token (the coupled protocol adds "
                              f"none); set algo.lam=0 (GRPO-C) or use rollout.mode=delayed")
        self.tokenizer = tokenizer
        self.out = Path(cfg.output_dir)
        # LoRA (None when lora.r == 0): adapters injected in place; checkpoints hold them and name
        # the base (model.path, else the run's copy in RUN/base).
        self.lora = apply_lora(model, cfg.lora, tokenizer=tokenizer, source=cfg.model.path if from_path else None,
                               run_dir=self.out, write=self.accelerator.is_main_process)
        self.examples = examples if examples is not None else load_examples(
            cfg.data.train, question_key=cfg.data.question_key, answer_key=cfg.data.answer_key,
            split=cfg.data.split, limit=cfg.data.max_examples)
        self.sampler = PromptSampler(self.examples, cfg.seed, cfg.data.shuffle)
        r = cfg.rollout
        self.rollout_cfg = r.rollout_config()
        eos = eos_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        self.generator = make_generator(r.backend, model, tokenizer, pad_token_id=self.pad_id, seed=cfg.seed,
                                        vllm=vllm_options(r, dtype=cfg.model.dtype, seed=cfg.seed, rank=self.rank,
                                                          world=self.world, output_dir=cfg.output_dir,
                                                          trust_remote_code=cfg.model.trust_remote_code))
        self.generator.sync_weights(model)  # a backend with its own copy of the weights starts from ours
        self.pool = r.sandbox_pool()  # after the generator: a backend that cannot start leaves nothing running
        self.engine = RolloutEngine(self.generator, tokenizer, self.pool, self.rollout_cfg, eos_token_ids=eos)
        self.execute_token_id = self.engine.chat.execute_token_id
        self._has_execute_token = self.execute_token_id is not None
        if not self._has_execute_token:  # the coupled protocol on a vocabulary without E (lam = 0)
            self.execute_token_id = 0  # any id: with lam = 0 the loss never uses it
        self.fence_close_ids = _fence_close_ids(tokenizer)
        try:  # before the model goes to the GPU: refuse a run that cannot fit
            self._check_memory(model)
        except ConfigError:
            self.pool.close()
            raise

        self.dist = make_strategy(cfg.distributed, self.accelerator)
        reference = None
        if cfg.algo.kl_coef > 0 and self.lora is None:  # a frozen copy (with LoRA: the base, adapters off)
            import copy
            reference = PolicyStats(copy.deepcopy(model), self.execute_token_id, cfg.optim.loss_chunk_size,
                                    r.temperature)
        # FSDP replaces the parameters by shards: the optimizer is built on what wrap() returns.
        self.policy = self.dist.wrap(PolicyStats(model, self.execute_token_id, cfg.optim.loss_chunk_size,
                                                 r.temperature))
        o = cfg.optim
        decay = [p for n, p in self.policy.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in self.policy.named_parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=o.lr, betas=tuple(o.betas))
        warm = o.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0)
        # The scheduler is not prepared: accelerate's wrapper steps it once per process per call
        # (warm-up N times too fast on N processes). It steps once per RL step, on every rank.
        self.optimizer = self.accelerator.prepare(self.optimizer)
        self.reference = None if reference is None else self.dist.prepare_reference(reference)
        if reward_fn is not None:
            self.reward_fn, self._verifier = reward_fn, None
        else:
            self.reward_fn, self._verifier = make_reward_fn(cfg.algo.reward, cfg.algo.reward_timeout_s)
        self.step = 0
        self.eval_fn, self.eval_every = eval_fn, eval_every

    # ------------------------------------------------------------------ helpers
    def _check_memory(self, model: nn.Module) -> None:
        """Log the per-GPU memory estimate; refuse (ConfigError) when it exceeds the GPU's free memory."""
        from ihgrpo.memory import gpu_memory, training_estimate
        from ihgrpo.rollout.backends import resolve_backend

        r = self.cfg.rollout
        backend = resolve_backend(r.backend)
        prompt_tokens = max(len(self.engine.prompt_ids(e.question)) for e in self.examples[:256])
        est = training_estimate(self.cfg, model, precision=self.precision, processes=self.world,
                                prompt_tokens=prompt_tokens, backend=backend)
        if self.accelerator.is_main_process:
            log.info("%s", est.summary())
        mem = gpu_memory(self.accelerator.device)
        if mem is not None and self.cfg.check_memory:
            # A vLLM engine (started already) holds its share; asleep during the update, it gives it back.
            headroom = int(r.vllm_gpu_memory_utilization * mem[1]) if backend == "vllm" and r.vllm_sleep_level else 0
            est.check(mem[0], str(self.accelerator.device), update_headroom=headroom)

    def _autocast(self):
        """The precision policy's autocast (bf16 on a GPU under model.dtype auto), for every forward
        pass: the rollout's too, so keys/values are computed in the compute dtype."""
        return self.precision.context(self.accelerator.device.type)

    def _model(self) -> nn.Module:
        return self.dist.unwrap(self.policy).model

    def close(self) -> None:
        self.pool.close()
        if self._verifier is not None:
            self._verifier.close()

    # ------------------------------------------------------------------ the loop
    def train(self) -> list[dict]:
        cfg = self.cfg
        if self.accelerator.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")
        if cfg.resume:
            self.step = self.load_checkpoint()
            self.generator.sync_weights(self._model())
        logger = _MetricLogger(self.out, cfg, enabled=self.accelerator.is_main_process, start_step=self.step)
        history = []
        try:
            with logger.progress(total=cfg.max_steps, start=self.step) as advance:
                while self.step < cfg.max_steps:
                    metrics = self.train_step(self.step)
                    self.step += 1
                    metrics["step"] = self.step
                    if self.eval_fn is not None and (
                            (self.eval_every and self.step % self.eval_every == 0) or self.step == cfg.max_steps):
                        t0 = time.perf_counter()
                        with self.dist.full_params(self.policy):  # FSDP: a collective, then rank 0 evaluates
                            if self.accelerator.is_main_process:
                                metrics.update({f"eval/{k}": v for k, v in self.eval_fn(self._model()).items()
                                                if isinstance(v, (int, float))})
                        metrics["time_eval_s"] = time.perf_counter() - t0
                    logger.log(metrics)
                    history.append(metrics)
                    advance(metrics)
                    if self.step % cfg.save_every == 0 or self.step == cfg.max_steps:
                        self.save_checkpoint()
        finally:
            logger.close()
        return history

    def train_step(self, step: int) -> dict:
        cfg, algo = self.cfg, self.cfg.algo
        t_step = time.perf_counter()
        gen_seed = (cfg.seed * 1_000_003 + step) * 64 + self.rank
        params = cfg.rollout.sampling_params()
        G, P = cfg.rollout.group_size, cfg.prompts_per_step
        # Each process rolls out its share of the prompts; groups never straddle processes. Every
        # round, all processes take one block of prompts of the same size, decided from the groups
        # kept on all of them: no prompt is rolled out twice and the sampler stays in step everywhere.
        want = _share(P, self.world, self.rank)
        budget = self.world * max(want, math.ceil(P * algo.oversample / self.world))  # prompts, all ranks
        kept: list[Trajectory] = []
        all_trajs: list[Trajectory] = []
        kept_adv: list[float] = []
        rolled = 0  # prompts rolled out this step, all ranks
        dropped_truncated = 0  # groups with fewer than min_valid non-truncated rollouts, this rank
        kept_per_rank = [0] * self.world  # groups with signal, per rank
        t0 = time.perf_counter()
        self._model().eval()
        # FSDP: the weights are gathered once for the whole rollout phase, not per decode step.
        with self.dist.full_params(self.policy):
            chunk = 0
            while sum(kept_per_rank) < P and rolled < budget:
                n = math.ceil(min(P - sum(kept_per_rank), budget - rolled) / self.world)
                examples = self._take_prompts(n)
                rolled += n * self.world
                # Seeds depend on (seed, step, rank, chunk) only, so a resumed run samples the same.
                chunk_params = dataclasses.replace(params, seed=gen_seed * 16 + chunk)
                chunk += 1
                with self._autocast():
                    trajs = self.engine.rollout([e.question for e in examples], G, chunk_params)
                rewards = self.reward_fn([t.answer for t in trajs], [examples[t.prompt_index].answer for t in trajs])
                for t, rew in zip(trajs, rewards):
                    t.reward = float(rew)
                all_trajs += trajs
                adv = group_advantages(rewards, G, std_normalize=algo.advantage == "grpo")
                for g in range(0, len(trajs), G):
                    group = trajs[g:g + G]
                    if algo.min_valid and sum(not t.truncated for t in group) < algo.min_valid:
                        dropped_truncated += 1  # too few complete rollouts to trust the group's baseline
                        continue
                    if algo.dynamic_sampling and len({t.reward for t in group}) == 1:
                        continue
                    kept += group
                    kept_adv += adv[g:g + G]
                kept_per_rank = self._gather_counts(len(kept) // G)
                if not algo.dynamic_sampling:
                    break
        # Exactly P groups in all: the first ones, in rank order.
        mine = max(0, min(kept_per_rank[self.rank], P - sum(kept_per_rank[:self.rank])))
        kept, kept_adv = kept[:mine * G], kept_adv[:mine * G]
        n_kept = min(P, sum(kept_per_rank))
        t_rollout = time.perf_counter() - t0
        self.generator.sleep()  # frees the GPU for the update when the backend has its own engine
        metrics = {f"rollout/{k}": v for k, v in batch_stats(all_trajs).items()}
        metrics["time_tokens_per_s"] = metrics["rollout/response_tokens"] * len(all_trajs) / max(t_rollout, 1e-9)
        metrics["reward"] = metrics.pop("rollout/accuracy", 0.0)
        metrics.update({"groups_rolled": rolled, "groups_kept": n_kept,
                        "groups_dropped_truncated": int(self._sum_across([dropped_truncated])[0]),
                        "time_rollout_s": t_rollout, **{f"time_{k}": v for k, v in self.engine.last_timing.items()}})

        t0 = time.perf_counter()
        if n_kept == 0:
            # No group carries signal (every reward equal): say so instead of looping forever.
            log.warning("step %d: no group had differing rewards%s after rolling out %d prompts; "
                        "no update this step", step + 1,
                        f" and {algo.min_valid} non-truncated rollouts" if algo.min_valid else "", rolled)
            metrics.update({"no_signal": 1.0, "lr": self.scheduler.get_last_lr()[0]})
        else:
            metrics.update(self._update(kept, kept_adv))
            metrics["no_signal"] = 0.0
        metrics["time_update_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.generator.sync_weights(self._model())  # the next rollout samples from the updated policy
        metrics["time_sync_weights_s"] = time.perf_counter() - t0
        metrics["time_step_s"] = time.perf_counter() - t_step
        return metrics

    def _take_prompts(self, n: int) -> list[Example]:
        # Every process advances the sampler identically and keeps its own slice, so the data
        # position is the same on all ranks (and in a checkpoint).
        block = self.sampler.take(n * self.world)
        return block[self.rank * n:(self.rank + 1) * n]

    def _gather_counts(self, count: int) -> list[int]:
        """Every rank's `count`, in rank order (the same list on all ranks)."""
        return [int(c) for c in self._sum_across([count if r == self.rank else 0 for r in range(self.world)])]

    def _sum_across(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        if self.world > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return t.tolist()

    def _update(self, trajs: list[Trajectory], advantages: list[float]) -> dict:
        cfg, algo, o = self.cfg, self.cfg.algo, self.cfg.optim
        keep = [not ((algo.mask_void and t.void) or (algo.mask_truncated and t.truncated)) for t in trajs]
        self._model().train()
        # A model handed in may carry gradients of earlier training (e.g. the demo's SFT): the
        # first update would add them in, and a reloaded copy of the same weights would not.
        self.optimizer.zero_grad(set_to_none=True)
        # Normalisers over the whole step on all processes, so that accumulation and DDP's mean
        # reproduce the single-process loss exactly.
        tokens = [sum(t.mask) if k else 0 for t, k in zip(trajs, keep)]
        total_tokens, total_seqs, total_rows = self._sum_across(
            [sum(tokens), sum(1 for n in tokens if n > 0), len(trajs)])
        norm_constant = algo.norm_constant or float(cfg.rollout.max_response_tokens)
        old = None
        order = list(range(len(trajs)))
        mb = o.micro_batch_size
        stats_sum: dict[str, float] = {}
        extremes: dict[str, float] = {}
        weight_sum = 0.0
        probe = UpdateProbe(self, trajs, keep) if cfg.log.update_diagnostics else None
        grad_norms = []
        n_updates = o.updates_per_step
        per_update = math.ceil(len(order) / n_updates)
        if n_updates > 1:  # off-policy after the first update: ratios need the old log-probs
            old = self._old_logprobs(trajs, advantages, keep)
        for u in range(n_updates):
            idx = order[u * per_update:(u + 1) * per_update]
            micros = [idx[s:s + mb] for s in range(0, len(idx), mb)]
            for j in range(self.dist.passes(len(micros))):
                if j >= len(micros):  # FSDP: this rank is out of micro-batches, the others are not
                    self._idle_pass()
                    continue
                micro = micros[j]
                batch = collate([trajs[i] for i in micro], [advantages[i] for i in micro], self.pad_id,
                                [keep[i] for i in micro], self.execute_token_id, self.fence_close_ids)
                batch = _to(batch, self.accelerator.device)
                if algo.aggregation == "token-mean":
                    w = batch.mask.sum().item() / max(total_tokens, 1)
                elif algo.aggregation == "seq-mean-token-mean":
                    w = (batch.mask.sum(-1) > 0).sum().item() / max(total_seqs, 1)
                else:
                    w = len(micro) / max(total_rows, 1)
                w *= self.world * n_updates  # DDP averages over processes; each update is its own mean
                if w == 0:
                    if self.dist.lockstep:
                        self._idle_pass()
                    continue
                # Ranks may hold different numbers of micro-batches (dynamic sampling keeps what
                # has signal), so DDP's per-backward all-reduce could deadlock: gradients are
                # accumulated locally and averaged once per update below.
                with self._autocast():  # the reference in the policy's numerics
                    ref = self._ref_logprobs(batch) if algo.kl_coef > 0 else None
                with self._autocast(), self.dist.no_sync(self.policy):
                    st = self.policy(batch.input_ids, batch.attention_mask, batch.labels,
                                     compute_entropy=algo.entropy_coef > 0)
                old_lp = None if old is None else _pad_old([old[i] for i in micro], batch.mask.shape).to(batch.mask.device)
                loss, stats = ih_grpo_loss_from_stats(
                    st.logp, st.logp_exec, st.z_exec, batch.labels, batch.advantages, batch.mask,
                    execute_token_id=self.execute_token_id, lam=algo.lam, old_logprobs=old_lp,
                    clip_low=algo.clip_low, clip_high=algo.clip_high, dual_clip=algo.dual_clip,
                    aggregation=algo.aggregation, c_mask=batch.decision if algo.c_mask == "decision" else None,
                    kl_coef=algo.kl_coef, ref_logprobs=ref, entropy=st.entropy, entropy_coef=algo.entropy_coef,
                    norm_constant=norm_constant, rollout_logprobs=batch.rollout_logprobs,
                    rollout_is=algo.rollout_is, rollout_is_cap=algo.rollout_is_cap)
                with self.dist.no_sync(self.policy):
                    self.accelerator.backward(loss * w)
                if not self._has_execute_token:
                    stats.pop("p_execute", None)  # the probability of a token that is not E
                for k, v in stats.items():
                    if k in _EXTREMES:  # the step's most extreme token, not a mean over micro-batches
                        extremes[k] = _EXTREMES[k](extremes.get(k, v), v)
                    else:
                        stats_sum[k] = stats_sum.get(k, 0.0) + v * w / (self.world * n_updates)
                weight_sum += w / (self.world * n_updates)
            self.dist.sync_gradients(self.policy)
            grad_norms.append(self.dist.clip_grad_norm(self.policy, o.grad_clip))
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        out = {f"loss/{k}": v / max(weight_sum, 1e-12) for k, v in stats_sum.items()}
        out.update({f"loss/{k}": v for k, v in extremes.items()})
        out["grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["lr"] = self.scheduler.get_last_lr()[0]
        return {**out, **(probe.after() if probe else {})}

    def _idle_pass(self, backward: bool = True) -> None:
        """A zero-weight pass on a 2-token row. Under FSDP every forward and backward is a
        collective, so a rank with fewer micro-batches than the busiest one runs these."""
        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.accelerator.device)
        zeros = torch.zeros((1, 1), device=ids.device)
        if backward and self.cfg.algo.kl_coef > 0:
            with self._autocast():
                self._ref_logprobs(TrainBatch(ids, torch.ones_like(ids), ids[:, 1:], zeros, zeros[0]))
        with torch.set_grad_enabled(backward), self._autocast():
            st = self.policy(ids, torch.ones_like(ids), ids[:, 1:])
        if backward:
            self.accelerator.backward(st.logp.sum() * 0.0)

    @torch.no_grad()
    def _old_logprobs(self, trajs, advantages, keep) -> list[torch.Tensor]:
        out = []
        mb = self.cfg.optim.micro_batch_size
        n = math.ceil(len(trajs) / mb)
        for j in range(self.dist.passes(n)):
            if j >= n:
                self._idle_pass(backward=False)
                continue
            micro = list(range(j * mb, min((j + 1) * mb, len(trajs))))
            batch = _to(collate([trajs[i] for i in micro], [advantages[i] for i in micro], self.pad_id,
                                [keep[i] for i in micro], self.execute_token_id), self.accelerator.device)
            with self._autocast():
                st = self.policy(batch.input_ids, batch.attention_mask, batch.labels)
            out += [row.detach().float().cpu() for row in st.logp]
        return out

    @torch.no_grad()
    def _ref_logprobs(self, batch: TrainBatch) -> torch.Tensor:
        if self.lora is not None:  # the reference is the base model: the policy with its adapters off
            with self.lora.disabled():
                return self.dist.unwrap(self.policy)(batch.input_ids, batch.attention_mask, batch.labels).logp
        return self.reference(batch.input_ids, batch.attention_mask, batch.labels).logp.detach()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> Path | None:
        """model/, optimizer, scheduler, RNG states (every rank's) and data position, written atomically."""
        self.accelerator.wait_for_everyone()
        rng = [rng_state()]
        if self.world > 1:
            from accelerate.utils import gather_object

            rng = gather_object(rng)
        # Under FSDP gathering the full state is a collective: every process takes part, rank 0 writes.
        weights = self.dist.model_state_dict(self.policy, trainable_only=self.lora is not None)
        optim_state = self.dist.optimizer_state_dict(self.policy, self.optimizer)
        if not self.accelerator.is_main_process:
            self.accelerator.wait_for_everyone()
            return None
        root = self.out / "checkpoints"
        final = root / f"step-{self.step:08d}"
        tmp = root / f".tmp-step-{self.step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if self.lora is not None:  # the adapters only; adapter_config.json names the base
            self.lora.save(tmp / "model", weights)
        else:
            self._model().save_pretrained(tmp / "model", state_dict=weights, safe_serialization=True)
        self.tokenizer.save_pretrained(tmp / "model")
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
        state = {"step": self.step, "sampler": self.sampler.state_dict(), "rng": rng[0], "rng_per_rank": rng}
        (tmp / "state.json").write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # atomic: a checkpoint directory is complete or absent
        fsync_dir(root)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self) -> int:
        root = self.out / "checkpoints"
        ckpts = sorted(p for p in root.glob("step-*") if (p / "state.json").exists()) if root.exists() else []
        if not ckpts:
            log.info("resume: no checkpoint in %s; starting from step 0", root)
            return 0
        ck = ckpts[-1]
        from safetensors.torch import load_file

        model = self._model()
        # Under FSDP rank 0 reads the files and broadcasts: the others pass empty states.
        reads = self.accelerator.is_main_process or not self.dist.lockstep
        weights = {}
        if reads and self.lora is not None:
            weights = self.lora.load_state(ck / "model")
        elif reads:
            for f in sorted((ck / "model").glob("*.safetensors")):
                weights.update(load_file(f))
        missing, unexpected = self.dist.load_model_state_dict(self.policy, weights)
        if self.lora is not None:  # the base weights come from model.path, not the checkpoint
            missing = [k for k in missing if "lora_" in k]
        tied = {k for k in missing if "lm_head" in k and getattr(model.config, "tie_word_embeddings", False)}
        if reads and (set(missing) - tied or unexpected):
            raise ConfigError(f"checkpoint {ck} does not match the model (missing {sorted(missing)[:3]}, "
                              f"unexpected {sorted(unexpected)[:3]})")
        self.dist.load_optimizer_state_dict(self.policy, self.optimizer, torch.load(
            ck / "optimizer.pt", weights_only=True) if reads else {})
        self.scheduler.load_state_dict(torch.load(ck / "scheduler.pt", weights_only=True))
        state = json.loads((ck / "state.json").read_text())
        self.sampler.load_state_dict(state["sampler"])
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        set_rng_state(per_rank[self.rank] if len(per_rank) == self.world else state["rng"])
        log.info("resumed from %s (step %d)", ck, state["step"])
        return int(state["step"])


# ----------------------------------------------------------------------------- logging
class _MetricLogger:
    def __init__(self, out: Path, cfg: TrainConfig, *, enabled: bool, start_step: int):
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self.tb = self.wandb = None
        self.cfg = cfg
        if not enabled:
            return
        # A resumed run rewrites the steps after its checkpoint, so the file matches an uninterrupted run.
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:
                self.tb = None
        if cfg.log.wandb:
            try:
                import wandb
                self.wandb = wandb.init(project=cfg.log.wandb_project, config=json.loads(json.dumps(
                    __import__("dataclasses").asdict(cfg), default=str)), dir=str(out))
            except Exception as exc:
                log.warning("W&B logging disabled: %s", exc)

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}
        clean["step"] = int(metrics["step"])
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and k != "step":
                    self.tb.add_scalar(k, v, clean["step"])
        if self.wandb is not None:
            self.wandb.log(clean, step=clean["step"])

    def progress(self, total: int, start: int):
        import contextlib

        if not (self.enabled and self.cfg.log.progress):
            return contextlib.nullcontext(lambda m: None)
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        @contextlib.contextmanager
        def bar():
            with Progress(TextColumn("[bold]RL[/bold] {task.completed}/{task.total}"), BarColumn(),
                          TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                          TimeRemainingColumn()) as prog:
                task = prog.add_task("rl", total=total, completed=start, info="")

                def advance(m):
                    prog.update(task, advance=1, info=f"reward {m.get('reward', 0):.3f} "
                                f"delay {m.get('rollout/delay_call_rate', 0):.2f}")
                yield advance
        return bar()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


# ----------------------------------------------------------------------------- small helpers
_EXTREMES = {"rollout_ratio_max": max, "rollout_ratio_min": min}


def _share(n: int, world: int, rank: int) -> int:
    if n % world:
        raise ConfigError(f"prompts_per_step ({n}) must be divisible by the number of processes ({world})")
    return n // world


def _fence_close_ids(tokenizer) -> tuple[int, ...]:
    """Vocabulary tokens that end a closing fence line ("```\\n"), for the decision c-mask."""
    ids = set()
    for text in ("```\n", "```\n\n"):
        enc = tokenizer.encode(text, add_special_tokens=False)
        if enc:
            ids.add(enc[-1])
    return tuple(sorted(ids))


def _to(batch: TrainBatch, device) -> TrainBatch:
    return TrainBatch(**{f.name: x.to(device) if isinstance(x := getattr(batch, f.name), torch.Tensor) else x
                         for f in dataclasses.fields(batch)})


def _pad_old(rows: list[torch.Tensor], shape) -> torch.Tensor:
    out = torch.zeros(shape, dtype=torch.float32)
    for i, r in enumerate(rows):
        n = min(len(r), shape[1])
        out[i, :n] = r[:n]
    return out
