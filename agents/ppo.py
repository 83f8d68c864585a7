"""PPO on the backtrack MDP with per-token process rewards (``halluc-rl ppo --config configs/ppo_tiny.yaml``).

CleanRL's ``ppo.py`` for a policy that can press backspace, read top to bottom:

1. **Rollouts** (``halluc_rl.rollout``): each update samples ``group_size`` answers to each of
   ``problems_per_update`` problems (a group branches from one prefilled prompt), with per-row seeded generators so
   that the answers do not depend on how problems are split across processes. The sampling log-probs are the old
   log-probs: the shared scorer reproduces them exactly, so the first epoch's ratio is 1.
2. **Rewards per action**: the outcome reward at the end, a process reward (oracle, trained or implicit PRM) as
   potential-based deltas or PURE min-form credit, the env's shaping (a cost per backtrack), and a KL penalty to the
   reference (k1 or k3), the policy with its LoRA adapter disabled, or its starting adapter when it continues one.
3. **Advantages**: ``gae`` (a value head on the policy's own final hidden states), ``mc`` (VinePPO: Monte-Carlo
   values branched from the cached states at step ends and around every backtrack, no critic: a backtrack's
   advantage is V(after the deletion) - V(before) plus its cost) or ``group`` (RLOO's leave-one-out baseline).
4. **The update**: clipped surrogate, clipped value loss, entropy bonus, whitened advantages, minibatch epochs,
   gradient clipping. Log-probs come from ``halluc_rl.scoring.score_actions`` in the policy's semantics.

Several processes (``accelerate launch --num_processes 2``) split the problems; gradients are averaged and every
global statistic (whitening, the token count of a minibatch) is reduced (``halluc_rl/distributed.py``), so the
run follows the single-process one. The maths lives in ``halluc_rl/losses.py``, VinePPO's values in
``halluc_rl/values.py``; runs stop on a non-finite loss, an exploding KL or a dead gradient (the shared
:class:`halluc_rl.training.DeadGradientStop`) with the update number (exit status 3), hold a lock on their folder,
checkpoint atomically and resume. A jump of the backtrack or truncation rate, the signature of reward hacking, is
warned about (:func:`halluc_rl.training.rate_jumps`). :func:`train` is the loop; each step of it is a function below it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from halluc_rl import distributed, losses
from halluc_rl.adapters import check_same_base, reference_mode
from halluc_rl.args import LoraArgs, ModelArgs, RewardArgs, RunArgs, SamplingArgs, SemanticsArgs, TaskArgs
from halluc_rl.atomic import atomic_write_json
from halluc_rl.checkpoints import (
    load_checkpoint,
    lock_run_dir,
    prepare_run_dir,
    publish,
    save_checkpoint,
    save_model_files,
    staging_dir,
)
from halluc_rl.config import (
    NonFiniteError,
    UsageError,
    adopt_semantics,
    check_choice,
    check_model_name,
    check_output_dir,
    check_positive,
    check_reward_args,
    check_task_args,
    cli,
    parse_cli,
)
from halluc_rl.data.tasks import Problem, encode_problem, load_problems
from halluc_rl.distributed import seed_of
from halluc_rl.evaluation import backtrack_counts, oracle_judges, ratio
from halluc_rl.generation import BacktrackGenerationConfig, row_generators
from halluc_rl.labels import line_break_ids
from halluc_rl.mixers import build_rewards
from halluc_rl.modeling import load_start_policy
from halluc_rl.rewards import RewardMixer
from halluc_rl.rollout import Rollout, rollout
from halluc_rl.scoring import score_actions
from halluc_rl.training import DeadGradientStop, rate_jumps
from halluc_rl.values import vine_advantages


@dataclass
class PPOArgs(RunArgs, RewardArgs, SamplingArgs, SemanticsArgs, TaskArgs):
    """What PPO trains on, its advantage estimator and its update (the task, the sampling temperature, the rewards
    and resume settings come from the shared blocks)."""

    output_dir: str = field(default="runs/ppo", metadata={"help": "Checkpoints, the policy, logs and history."})
    num_problems: int = field(default=2000, metadata={"help": "Train problems in the pool the updates draw from."})
    updates: int = field(default=100, metadata={"help": "PPO updates (a rollout and its epochs each)."})
    problems_per_update: int = field(default=16, metadata={"help": "Problems per rollout, across all processes."})
    group_size: int = field(default=4, metadata={"help": "Answers sampled per problem (a group; >= 2 for group)."})
    max_new_tokens: int = field(default=96, metadata={"help": "Actions per answer, backtracks included."})
    backtrack: bool = field(default=True, metadata={
        "help": "Let the policy backtrack (false: the control arm, the backtrack action masked everywhere)."})
    process_credit: str = field(default="return", metadata={
        "help": "return (the process reward joins the returns the estimator sees) or immediate (each action's own "
                "process reward is added to its advantage, not to earlier actions')."})
    kl_coef: float = field(default=0.02, metadata={"help": "Per-action KL penalty to the reference (0: none)."})
    kl_estimator: str = field(default="k1", metadata={"help": "k1 or k3 (Schulman's estimators)."})
    max_kl: float = field(default=2.0, metadata={"help": "Stop the run when an epoch's approx KL exceeds this."})
    advantage: str = field(default="group", metadata={"help": "gae (value head), mc (VinePPO) or group (RLOO)."})
    gamma: float = field(default=1.0, metadata={"help": "Discount."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    mc_branches: int = field(default=4, metadata={"help": "mc: continuations per estimated state."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate."})
    epochs: int = field(default=2, metadata={"help": "Passes over each rollout."})
    minibatches: int = field(default=2, metadata={"help": "Minibatches per pass."})
    clip: float = field(default=0.2, metadata={"help": "Policy ratio clip."})
    vf_coef: float = field(default=0.5, metadata={"help": "gae: value loss coefficient."})
    vf_clip: float = field(default=0.2, metadata={"help": "gae: value clip around the old values."})
    ent_coef: float = field(default=0.0, metadata={"help": "Entropy bonus."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping."})
    whiten: bool = field(default=True, metadata={"help": "Normalise advantages over the rollout."})
    save_every: int = field(default=25, metadata={"help": "Updates between checkpoints."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept."})
    seed: int = field(default=0, metadata={"help": "Seeds the sampling, the problem order and LoRA's init."})
    report_to: str = field(default="tensorboard", metadata={"help": "tensorboard or none."})


def validate(args: PPOArgs, model_args: ModelArgs) -> None:
    """Every check that needs no model, before anything is loaded or written (one-line UsageErrors)."""
    check_task_args(args, args.num_problems, "num_problems")
    check_output_dir(args.output_dir)
    check_reward_args(args, args.task)
    check_choice("process_credit", args.process_credit, ("return", "immediate"))
    check_choice("kl_estimator", args.kl_estimator, ("k1", "k3"))
    check_choice("advantage", args.advantage, ("gae", "mc", "group"))
    check_choice("report_to", args.report_to, ("tensorboard", "none"))
    check_positive(args, "num_problems", "updates", "problems_per_update", "group_size", "max_new_tokens",
                   "temperature", "learning_rate", "epochs", "minibatches", "clip", "save_every", "mc_branches")
    check_positive(args, "kl_coef", "ent_coef", allow_zero=("kl_coef", "ent_coef"))
    if args.advantage == "group" and args.group_size < 2:
        raise UsageError("group_size: the group baseline needs at least 2 answers per problem")
    if args.problems_per_update % args.minibatches:
        raise UsageError("minibatches: must divide problems_per_update")
    check_model_name(model_args.model_name_or_path)


@dataclass
class Run:
    """What every update reads and moves: the policy, its value head and optimiser, the problems, rewards."""

    acc: Accelerator
    out: Path
    model: torch.nn.Module
    tok: object
    bt: int
    head: torch.nn.Linear  # the value head (gae), on the policy's final hidden states
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    pool: list[Problem]
    mixer: RewardMixer
    gen_config: BacktrackGenerationConfig
    newline_ids: set[int]
    start: int  # updates done before this process started (resume)
    history: list[dict]
    writer: SummaryWriter | None
    references: dict[int, list[int]] = field(default_factory=dict)  # each problem's reference, encoded once


def main(argv: list[str] | None = None) -> int:
    return cli("halluc-rl ppo", lambda: train(*parse_cli([PPOArgs, ModelArgs, LoraArgs], argv, prog="halluc-rl ppo")))


def train(args: PPOArgs, model_args: ModelArgs, lora: LoraArgs, rewards: RewardMixer | None = None) -> int:
    """Validate, then run (resuming from the newest complete checkpoint). ``rewards`` replaces the configured reward
    plug-ins (Python API: any outcome/process plug-in, see ``halluc_rl.rewards``); that is said in one line."""
    validate(args, model_args)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    if rewards is not None and acc.is_main_process:
        print(f"ppo: using the rewards passed to train(); the configured ones are ignored (process_reward "
              f"{args.process_reward!r}, backtrack_cost {args.backtrack_cost})")
    with lock_run_dir(args.output_dir, enabled=acc.is_main_process):  # one run per folder, for the whole run
        run = set_up(args, model_args, lora, acc, rewards)
        dead = DeadGradientStop(unit="update")
        bar = tqdm(range(run.start, args.updates), initial=run.start, total=args.updates, desc="ppo",
                   dynamic_ncols=True, disable=not acc.is_main_process)
        for update in bar:
            began = time.time()
            local = distributed.process_share(args.seed, len(run.pool), args.problems_per_update, update,
                                              acc.process_index, acc.num_processes)
            ro = collect(run, args, update, local)
            per_action, immediate, kl, old_values = rewards_with_kl(run, args, ro)
            adv, returns = advantages(run, args, ro, per_action, old_values, update, local)
            adv = losses.final_advantages(adv, immediate, ro.action_mask, args.whiten,  # whitened over all processes
                                          reduce=partial(distributed.all_sum, device=run.acc.device))
            metrics = update_policy(run, args, ro, adv, returns, old_values, update)
            row = log_row(run, ro, kl, metrics, update, began)
            bar.set_postfix(acc=f"{row['rollout/accuracy']:.2f}", bt=f"{row['rollout/backtrack_rate']:.3f}",
                            kl=f"{row['losses/approx_kl']:.3f}")
            if acc.is_main_process:
                for warning in rate_jumps(run.history):
                    print(f"ppo: {warning}")
            dead.observe(update + 1, max(metrics.get("losses/grad_norm", [None]), key=lambda v: v or 0.0),
                         row.get("losses/loss"), row.get("losses/entropy"),
                         advice=f"the last checkpoint is kept (lower the learning rate, now {args.learning_rate})")
            checkpoint_or_stop(run, args, row, update)
        finish(run)
    return 0


def set_up(args: PPOArgs, model_args: ModelArgs, lora: LoraArgs, acc: Accelerator,
           rewards: RewardMixer | None) -> Run:
    """The run folder (checked on the main process), the policy and its value head, the optimiser (resumed
    from the newest complete checkpoint), the problem pool, the rewards and the sampling config."""
    out = Path(args.output_dir)
    found = [None]
    if acc.is_main_process:
        found = [prepare_run_dir(out, [args, model_args, lora], resume=args.resume,
                                 allow_change=args.allow_config_change)]
    if acc.num_processes > 1:
        broadcast_object_list(found)
    resume = found[0]
    if resume:
        check_same_base(resume, model_args.model_name_or_path)
    torch.manual_seed(args.seed)
    try:
        model, tok, bt = load_start_policy(model_args.model_name_or_path, lora, model_args.dtype, reference=True)
    except OSError as err:
        raise UsageError(" ".join(str(err).split())) from err
    adopt_semantics(model, args)  # the policy's own semantics unless overridden (recorded, saved)
    if not hasattr(model, "peft_config") and args.kl_coef > 0:
        raise UsageError("kl_coef: a fully fine-tuned policy has no adapter to disable for its reference; set "
                         "use_lora: true or kl_coef: 0")
    model.to(acc.device).eval()  # eval throughout: no dropout, the scorer reproduces the sampling log-probs
    head = torch.nn.Linear(model.config.hidden_size, 1).to(acc.device)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)
    start, history = 0, []
    if resume:
        state = load_checkpoint(resume, model, {"optimizer": optimizer, "value_head": head})
        start, history = state["global_step"], state["log_history"]
    pool = load_problems(args.task, "train", args.num_problems, args.data_files, seed=args.task_seed)
    mixer = rewards if rewards is not None else build_rewards(args, tok)
    gen_config = BacktrackGenerationConfig(do_sample=True, temperature=args.temperature, loop_guard=None,
                                           max_new_tokens=args.max_new_tokens, return_logprobs=True,
                                           backtrack_bias=0.0 if args.backtrack else float("-inf"))
    newline_ids = line_break_ids(tok)
    tensorboard = args.report_to == "tensorboard" and acc.is_main_process
    writer = SummaryWriter(str(out / "tensorboard")) if tensorboard else None
    return Run(acc, out, model, tok, bt, head, params, optimizer, pool, mixer, gen_config, newline_ids, start,
               history, writer)


def collect(run: Run, args: PPOArgs, update: int, local: list[int]) -> Rollout:
    """The rollout of ``group_size`` answers to each local problem, each row on its own seeded stream."""
    seeds = [seed_of(args.seed, update, p, j) for p in local for j in range(args.group_size)]
    return rollout(run.model, run.tok, [run.pool[p] for p in local], run.mixer, run.gen_config,
                   num_samples=args.group_size, generator=row_generators(seeds, run.acc.device))


def rewards_with_kl(run: Run, args: PPOArgs,
                    ro: Rollout) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The rewards [B, S] the estimator sees (process form and credit applied, the KL penalty to the reference
    subtracted), the immediate process credit [B, S] (None unless ``process_credit: immediate``), the
    per-action KL [B, S] and the old values [B, S] (gae; zeros otherwise)."""
    mask = ro.action_mask
    rewards, immediate = losses.process_credit(ro.rewards, ro.process_rewards, mask, args.process_form,
                                               args.process_credit)
    with torch.no_grad():
        kl = torch.zeros_like(rewards)  # [B, S]
        if args.kl_coef > 0:
            with reference_mode(run.model):
                ref_logp = score_actions(run.model, ro.prompt_ids, ro.actions, ro.generation.config,
                                         with_entropy=False).logprobs.cpu()  # [B, S]
            kl = losses.kl_estimate(ro.logprobs, ref_logp, args.kl_estimator) * mask
            rewards -= args.kl_coef * kl
        old_values = torch.zeros_like(rewards)  # [B, S]
        if args.advantage == "gae":
            hidden = score_actions(run.model, ro.prompt_ids, ro.actions, ro.generation.config,
                                   return_hidden=True, with_entropy=False).hidden  # [B, S, H]
            old_values = run.head(hidden).squeeze(-1).cpu() * mask
    return rewards, immediate, kl, old_values


def advantages(run: Run, args: PPOArgs, ro: Rollout, rewards: torch.Tensor, old_values: torch.Tensor,
               update: int, local: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, S] of the chosen estimator (without a critic, the advantages twice)."""
    if args.advantage == "gae":
        return losses.gae(rewards, old_values, ro.action_mask, args.gamma, args.lam)
    if args.advantage == "group":
        adv = losses.group_advantages(rewards, ro.action_mask, args.group_size, args.gamma)
        return adv, adv
    def seed(b: int, t: int, j: int) -> int:  # branch j of the state before action t of row b
        return seed_of(args.seed, update, 7, local[b // args.group_size], b % args.group_size, t, j)

    adv = vine_advantages(run.model, run.tok, ro, rewards, run.newline_ids, run.bt, args.mc_branches,
                          replace(run.gen_config, return_logprobs=False), seed, run.acc.device)
    return adv, adv


def update_policy(run: Run, args: PPOArgs, ro: Rollout, adv: torch.Tensor, returns: torch.Tensor,
                  old_values: torch.Tensor, update: int) -> dict[str, list[float]]:
    """Minibatch epochs over the update's problems: the same global minibatches of problem slots in any number
    of processes, each process on its rows of them. Returns each loss metric's value per minibatch."""
    rank, world = run.acc.process_index, run.acc.num_processes
    metrics: dict[str, list[float]] = {}
    for epoch in range(args.epochs):
        slots = np.random.default_rng(seed_of(args.seed, update, epoch)).permutation(args.problems_per_update)
        for batch in np.array_split(slots, args.minibatches):
            mine = sorted(int(s) // world for s in batch if s % world == rank)  # this process's problems
            rows = [i * args.group_size + j for i in mine for j in range(args.group_size)]
            minibatch_step(run, args, ro, rows, adv, returns, old_values, update, metrics)
    return metrics


def minibatch_step(run: Run, args: PPOArgs, ro: Rollout, rows: list[int], adv: torch.Tensor,
                   returns: torch.Tensor, old_values: torch.Tensor, update: int,
                   metrics: dict[str, list[float]]) -> None:
    """One optimiser step on ``rows``, its loss normalised by the minibatch's action count over all processes.
    A process with no rows adds zero gradients to the average."""
    mask, device, world = ro.action_mask, run.acc.device, run.acc.num_processes
    m = mask[rows].to(device)  # [b, S]
    count = distributed.all_sum(m.sum().float())  # the minibatch's actions over all processes
    if rows:
        scores = score_actions(run.model, [ro.prompt_ids[r] for r in rows], ro.actions[rows].to(device),
                               ro.generation.config, return_hidden=args.advantage == "gae")
        pg, clipfrac, approx_kl = losses.ppo_policy_loss(scores.logprobs, ro.logprobs[rows].to(device),
                                                         adv[rows].to(device), m, args.clip, count / world)
        entropy = (scores.entropy * m).sum() / (count / world)
        loss = pg - args.ent_coef * entropy
        if args.advantage == "gae":
            v = run.head(scores.hidden).squeeze(-1)  # [b, S]
            v_loss = losses.ppo_value_loss(v, old_values[rows].to(device), returns[rows].to(device), m,
                                           args.vf_clip, count / world)
            loss = loss + args.vf_coef * v_loss
            metrics.setdefault("losses/value", []).append(float(v_loss.detach()))
            metrics.setdefault("losses/explained_variance", []).append(
                losses.explained_variance(v.detach().cpu(), returns[rows], mask[rows]))
        if not torch.isfinite(loss):
            raise NonFiniteError(f"update {update + 1}: the loss is {float(loss)}; "
                                 "the last checkpoint is kept")
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
    else:  # none of this minibatch's problems is here
        distributed.zero_gradients(run.params)
    distributed.average_gradients(run.params)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.max_grad_norm)
    run.optimizer.step()
    metrics.setdefault("losses/grad_norm", []).append(float(grad_norm))  # before clipping; the dead-gradient stop
    if rows:
        for key, value in (("losses/loss", loss), ("losses/policy", pg), ("losses/entropy", entropy),
                           ("losses/clipfrac", clipfrac), ("losses/approx_kl", approx_kl)):
            metrics.setdefault(key, []).append(float(value.detach()))


def log_row(run: Run, ro: Rollout, kl: torch.Tensor, metrics: dict[str, list[float]], update: int,
            began: float) -> dict:
    """The update's history row (rollout sums over processes, loss means), also sent to tensorboard."""
    c = backtrack_counts(ro.generation, [run.references.setdefault(id(p), encode_problem(p, run.tok)[1])
                                         for p in ro.problems], oracle_judges(run.tok, ro.problems))
    bt = c.all_sum(run.acc.device).metrics()  # pooled over processes: backtrack rate, precision, false rate
    local_stats = torch.tensor([float(ro.reward_parts["correct"].sum()), float(len(ro.problems)), float(kl.sum()),
                                float(ro.action_mask.sum()), float(ro.rewards.sum()),
                                float((~ro.generation.finished).sum())], dtype=torch.float64)
    t = distributed.all_sum(local_stats, run.acc.device).tolist()
    row = {"update": update + 1, "rollout/accuracy": t[0] / t[1], "rollout/backtrack_rate": bt["backtrack_rate"],
           "rollout/truncated_rate": t[5] / t[1], "rollout/backtrack_precision": bt["backtrack_precision"],
           "rollout/false_backtrack_rate": bt["false_backtrack_rate"], "rollout/kl": ratio(t[2], t[3]),
           "rollout/return": t[4] / t[1], "rollout/actions": t[3], "time/update_s": time.time() - began}
    row.update({f"rollout/reward_{k}": float(v.sum(1).mean()) for k, v in ro.reward_parts.items()})
    row.update({k: float(np.mean(v)) for k, v in metrics.items()})
    run.history.append(row)
    if run.writer is not None:
        for key, value in row.items():
            if key != "update" and value is not None and np.isfinite(value):
                run.writer.add_scalar(key, value, update + 1)
    return row


def checkpoint_or_stop(run: Run, args: PPOArgs, row: dict, update: int) -> None:
    """A checkpoint every ``save_every`` updates; an approx KL above ``max_kl`` saves one and stops."""
    exploded = row["losses/approx_kl"] > args.max_kl
    if run.acc.is_main_process and ((update + 1) % args.save_every == 0 or exploded):
        save_checkpoint(run.out, update + 1, run.model, run.tok, {"optimizer": run.optimizer.state_dict(),
                                                                  "value_head": run.head.state_dict()},
                        {"log_history": run.history}, keep=args.save_total_limit)
    if exploded:
        raise NonFiniteError(f"update {update + 1}: the approx KL {row['losses/approx_kl']:.3g} exceeds "
                             f"max_kl {args.max_kl}; saved checkpoint-{update + 1} (lower the learning rate)")


def finish(run: Run) -> None:
    """The policy, its value head and the history, each file complete (main process), then a barrier."""
    if run.acc.is_main_process:
        staging = staging_dir(run.out)
        save_model_files(run.model, run.tok, staging)
        torch.save(run.head.state_dict(), staging / "value_head.pt")
        publish(staging, run.out)
        atomic_write_json(run.out / "log_history.json", run.history)
        last = {k: round(v, 4) for k, v in run.history[-1].items() if isinstance(v, float)}
        print(f"saved the policy to {run.out}; " + json.dumps(last))
    run.acc.wait_for_everyone()


if __name__ == "__main__":
    raise SystemExit(main())
