"""The demo's stages, shared by ``halluc-rl demo`` and its ablation: each trains one policy (or PRM) into a folder.

A stage's settings come from a YAML file in ``DemoArgs.stage_configs`` (the shipped ``configs/demo/``:
``sft.yaml``, ``dpo.yaml``, ``ppo.yaml``, ``prm.yaml``), read by the parser of the command that trains it (its
dataclasses, TRL's ``TrlParser``, as ``--config`` reads a file), with the demo's options (seed, task, budgets,
learning rates, the stage's folder and starting policy) on top. Each stage is exactly what ``halluc-rl sft
--config configs/demo/sft.yaml --option value ...`` would train, and a rerun skips a stage already finished
with the same resolved config.

Imports run one way: ``demo`` -> ``ablation`` -> ``stages`` and ``demo`` -> ``stages``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import TrlParser

from halluc_rl.agents import dpo, ppo, pretrain, prm, sft
from halluc_rl.args import LoraArgs, ModelArgs
from halluc_rl.atomic import atomic_write_json
from halluc_rl.checkpoints import finished_run
from halluc_rl.config import UsageError, check_types, read_config_mapping
from halluc_rl.data.errors import PLAUSIBLE_KINDS
from halluc_rl.data.problems import encode_problem
from halluc_rl.data.tasks import load_problems
from halluc_rl.evaluation import evaluate_policy, majority_vote
from halluc_rl.modeling import load_policy

SHIPPED_STAGE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
"""The stage configs of the documented demo (``configs/demo/`` in the repository; ``configs/demo/deps/`` on
``deps``)."""

TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "arithmetic": dict(num_train_problems=1500, num_eval_problems=200, error_kinds=list(PLAUSIBLE_KINDS),
                       error_rate=0.25, sft_epochs=2.0, backtrack_head="factorized", eval_task=None),
    # deps (docs/efficacy.md): the settings of configs/sft_tiny-deps.yaml, evaluated beyond the training length
    "deps": dict(num_train_problems=2000, num_eval_problems=300, error_kinds=["premature"], error_rate=0.5,
                 sft_epochs=3.0, backtrack_head="softmax", eval_task="deps:steps=4"),
}
"""Per demo task, the options that ``None`` stands for (its documented recipe); ``eval_task`` None: the task."""

STAGE_TYPES: dict[str, tuple[type, ...]] = {
    "sft": (sft.SFTScriptArgs, ModelArgs, LoraArgs, sft.SFTConfig),
    "dpo": (dpo.DPOScriptArgs, ModelArgs, LoraArgs, dpo.DPOConfig),
    "ppo": (ppo.PPOArgs, ModelArgs, LoraArgs),
    "prm": (prm.PRMScriptArgs, ModelArgs, LoraArgs, prm.PRMConfig),
    "pretrain": (pretrain.PretrainArgs,),
}
"""Each stage config file's dataclasses: those its command (``halluc-rl sft``, ``dpo``, ``ppo``, ``prm``,
``pretrain``) parses."""


@dataclass
class DemoArgs:
    """The pipeline's budget and settings (defaults: the documented demo, docs/efficacy.md)."""

    output_dir: str = field(default="runs/demo", metadata={"help": "Where policies, results and plots go."})
    seed: int = field(default=0, metadata={"help": "Seeds training, sampling and the task."})
    task: str = field(default="arithmetic", metadata={
        "help": "The offline task, with settings if wanted (arithmetic:max_value=50,max_steps=4)."})
    eval_task: str | None = field(default=None, metadata={
        "help": "The held-out task every stage is evaluated on (None: the task's own: arithmetic itself, "
                "deps:steps=4 on deps, one needed line longer than training)."})
    num_train_problems: int | None = field(default=None, metadata={
        "help": "Training problems (every stage, both arms; None: 1500 on arithmetic, 2000 on deps)."})
    num_eval_problems: int | None = field(default=None, metadata={
        "help": "Held-out test problems per evaluation (None: 200 on arithmetic, 300 on deps)."})
    num_samples: int = field(default=4, metadata={"help": "Samples per problem at temperature 1."})
    sft_epochs: float | None = field(default=None, metadata={
        "help": "SFT epochs (None: 2 on arithmetic, whose curriculum cap rises each epoch; 3 on deps)."})
    sft_learning_rate: float = field(default=2e-3, metadata={"help": "SFT (LoRA) learning rate."})
    error_rate: float | None = field(default=None, metadata={
        "help": "Share of SFT examples with plausible errors (None: 0.25 on arithmetic, 0.5 on deps)."})
    error_kinds: list[str] | None = field(default=None, metadata={
        "help": "The plausible errors typed in SFT (None: digit, operator, step, check on arithmetic, where check "
                "needs arithmetic:check=1 or 2; premature on deps, which also has unneeded and slip)."})
    backtrack_head: str | None = field(default=None, metadata={
        "help": "factorized, softmax or calibrated (None: factorized on arithmetic, softmax on deps)."})
    semantics: str = field(default="rewind", metadata={
        "help": "rewind (a backspace forgets what it deleted) or retry (it stays in the context): the SFT stage "
                "trains the policy in it, and every later stage and evaluation runs it there."})
    dpo_steps: int = field(default=60, metadata={"help": "DPO optimiser steps (0: skip the stage)."})
    dpo_form: str = field(default="single", metadata={"help": "single or continuation pairs."})
    dpo_problems: int = field(default=256, metadata={"help": "Problems the policy answers for the DPO pairs."})
    dpo_learning_rate: float = field(default=1e-4, metadata={"help": "DPO learning rate."})
    dpo_beta: float = field(default=0.5, metadata={"help": "DPO beta."})
    counter_ratio: float = field(default=3.0, metadata={"help": "DPO counter-pairs per error pair."})
    ppo_updates: int = field(default=100, metadata={"help": "PPO updates, in each arm."})
    ppo_advantage: str = field(default="group", metadata={"help": "gae, mc or group."})
    ppo_process_reward: str = field(default="oracle", metadata={"help": "none, oracle, prm or implicit."})
    ppo_process_credit: str = field(default="immediate", metadata={"help": "return or immediate."})
    ppo_learning_rate: float = field(default=3e-4, metadata={"help": "PPO learning rate."})
    kl_coef: float = field(default=0.02, metadata={"help": "PPO KL penalty to the reference."})
    backtrack_cost: float = field(default=0.1, metadata={"help": "PPO reward charged per backtrack."})
    max_new_tokens: int = field(default=0, metadata={
        "help": "Longest answer, in actions, for DPO sampling, PPO rollouts and evaluation (0: 128, 96 and 128, "
                "sized for the default task; check lines double an answer)."})
    use_lora: bool = field(default=True, metadata={
        "help": "LoRA policies (true) or full fine-tuning in every stage (false; PPO then needs --kl_coef 0: its KL "
                "reference is the policy with its adapter disabled)."})
    stage_configs: str | None = field(default=None, metadata={
        "help": "A folder of stage configs (sft.yaml, dpo.yaml, ppo.yaml, and prm.yaml on arithmetic or "
                "pretrain.yaml for the deps ablation's retry-data rows: the settings the options above leave alone); "
                "None: the shipped configs/demo (configs/demo/deps on deps)."})
    stages: list[str] = field(default_factory=list, metadata={
        "help": "Run only these stages (empty: all of base, plain_sft, backtrack_sft, dpo, ppo, control_ppo); each "
                "needs the stage it starts from, trained by an earlier run into the same folder or named too. The "
                "summary needs ppo and control_ppo."})
    ablate: bool = field(default=False, metadata={"help": "Run every ablation row over --seeds seeds."})
    seeds: int = field(default=3, metadata={"help": "--ablate: seeds per row."})
    rows: list[str] = field(default_factory=list, metadata={
        "help": "--ablate: the groups of rows to run (empty: all of the task's). deps has stages (SFT in both "
                "semantics, LoRA and full fine-tuning, then DPO and PPO) and pretrain (retry data at 4 error "
                "rates); arithmetic has stages."})

    def __post_init__(self) -> None:
        """Fill the options left None with the task's documented recipe (:data:`TASK_DEFAULTS`)."""
        defaults = TASK_DEFAULTS.get(self.task.partition(":")[0], TASK_DEFAULTS["arithmetic"])
        for name, value in defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        if self.eval_task is None:
            self.eval_task = self.task


def stage_config(args: DemoArgs, stage: str, overrides: dict[str, Any]) -> tuple:
    """The dataclasses of ``stage`` (a key of :data:`STAGE_TYPES`): its YAML file in ``args.stage_configs`` with
    ``overrides`` on top, through its command's parser (unknown keys and mistyped values are UsageErrors)."""
    path = Path(args.stage_configs or shipped_stage_configs(args.task)) / f"{stage}.yaml"
    if not path.is_file():
        raise UsageError(f"stage_configs: no such file {path}; give a folder holding "
                         f"{', '.join(demo_stages(args))} (.yaml), like {shipped_stage_configs(args.task)}")
    data = read_config_mapping(path, "stage_configs")
    parser = TrlParser(STAGE_TYPES[stage])
    unknown = parser.set_defaults_with_config(**{**data, **overrides})  # as --config sets a file's values
    if unknown:
        raise UsageError(f"stage_configs: {path}: unknown options {unknown[::2]}")
    try:
        parsed = parser.parse_args_into_dataclasses(args=[])
    except ValueError as err:
        raise UsageError(f"stage_configs: {path}: {' '.join(str(err).split())}") from err
    for obj in parsed:
        check_types(obj)
    return tuple(parsed)


def shipped_stage_configs(task: str) -> Path:
    """The shipped stage configs of ``task``'s demo: ``configs/demo/deps`` on ``deps``, else ``configs/demo``."""
    return SHIPPED_STAGE_CONFIGS / "deps" if task.partition(":")[0] == "deps" else SHIPPED_STAGE_CONFIGS


def demo_stages(args: DemoArgs) -> tuple[str, ...]:
    """The stage configs the run reads: no PRM row on ``deps``; its retry-data rows (``pretrain.yaml``) only when
    the ablation runs them."""
    if args.task.partition(":")[0] != "deps":
        return "sft", "dpo", "ppo", "prm"
    return ("sft", "dpo", "ppo") + (("pretrain",) if args.ablate and (not args.rows or "pretrain" in args.rows)
                                    else ())


def check_stage_configs(args: DemoArgs) -> None:
    """Parse every stage config file before anything runs, so a typo in one is a one-line error at the start."""
    for stage in demo_stages(args):
        stage_config(args, stage, {})


def base_model(args: DemoArgs) -> str:
    """The model the SFT stages start from: the SFT stage config's ``model_name_or_path`` (one home)."""
    return stage_config(args, "sft", {})[1].model_name_or_path


def _length(args: DemoArgs, *keys: str) -> dict[str, int]:
    """``max_new_tokens`` under each of ``keys`` when the demo sets it (0 keeps the stage file's value)."""
    return dict.fromkeys(keys, args.max_new_tokens) if args.max_new_tokens else {}


def sft_stage(args: DemoArgs, out: Path, error_source: str, head: str) -> Path:
    """Masked-error SFT of the tiny model (``error_source`` none: plain SFT) into ``out``."""
    configs = stage_config(args, "sft", dict(
        output_dir=str(out), task=args.task, num_train_problems=args.num_train_problems, task_seed=args.seed,
        error_source=error_source, error_kinds=list(args.error_kinds), error_rate=args.error_rate,
        backtrack_head=head, num_train_epochs=args.sft_epochs, learning_rate=args.sft_learning_rate,
        seed=args.seed, use_lora=args.use_lora, semantics=args.semantics))
    if not finished_run(out, configs):  # a rerun skips a finished stage
        sft.train(*configs)
    return out


def dpo_stage(args: DemoArgs, out: Path, start: Path, form: str) -> Path:
    """Token-level DPO of the policy in ``start`` at its own errors (``form`` single or continuation pairs)."""
    configs = stage_config(args, "dpo", dict(
        output_dir=str(out), model_name_or_path=str(start), task=args.task, num_problems=args.dpo_problems,
        task_seed=args.seed, form=form, counter_ratio=args.counter_ratio, max_steps=args.dpo_steps,
        learning_rate=args.dpo_learning_rate, beta=args.dpo_beta, seed=args.seed, use_lora=args.use_lora,
        **_length(args, "max_new_tokens")))
    if not finished_run(out, configs):
        dpo.train(*configs)
    return out


def ppo_stage(args: DemoArgs, out: Path, start: Path, backtrack: bool = True, **overrides) -> Path:
    """PPO of the policy in ``start`` (``backtrack`` False: the action masked); ``overrides`` are PPOArgs values
    of an ablation row."""
    settings = dict(output_dir=str(out), model_name_or_path=str(start), task=args.task, task_seed=args.seed,
                    num_problems=args.num_train_problems, updates=args.ppo_updates, backtrack=backtrack,
                    advantage=args.ppo_advantage, process_reward=args.ppo_process_reward,
                    process_credit=args.ppo_process_credit, learning_rate=args.ppo_learning_rate,
                    kl_coef=args.kl_coef, backtrack_cost=args.backtrack_cost, seed=args.seed,
                    use_lora=args.use_lora, **_length(args, "max_new_tokens"))
    configs = stage_config(args, "ppo", {**settings, **overrides})  # a row's values replace the demo's
    if not finished_run(out, configs):
        ppo.train(*configs)
    return out


def prm_stage(args: DemoArgs, out: Path, policy: Path) -> Path:
    """A token-classification PRM trained on Monte-Carlo labels of ``policy``'s answers (``halluc-rl prm``)."""
    configs = stage_config(args, "prm", dict(
        output_dir=str(out), policy=str(policy), task_seed=args.seed, label_seed=args.seed, seed=args.seed,
        **_length(args, "mc_max_new_tokens", "max_new_tokens")))
    if not finished_run(out, configs):
        prm.train(*configs)
    return out


def pretrain_stage(args: DemoArgs, out: Path, error_rate: float, semantics: str) -> Path:
    """Continued pretraining of the base model on retry data (``error_rate`` of the solutions hold one of
    ``args.error_kinds``, laid out in ``semantics``; 0: the clean control), as ``halluc-rl pretrain`` does. A rerun
    skips a finished run of the same config, as for every other stage."""
    (config,) = stage_config(args, "pretrain", dict(
        output_dir=str(out), task=args.task, init=base_model(args), error_rate=error_rate,
        error_kinds=list(args.error_kinds), semantics=semantics, seed=args.seed))
    if not finished_run(out, [config]):
        pretrain.pretrain(config)
    return out


def cached_metrics(cache: Path, settings: dict, policy: str | Path, measure) -> dict:
    """``measure(model, tokenizer, problems)`` of ``policy`` on the evaluation problems (``settings``' task,
    count and seed), or the metrics saved in ``cache`` for the same ``settings`` (a rerun skips an evaluation
    already done); written atomically."""
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("settings") == settings:
            return saved["metrics"]
    model, tokenizer, _ = load_policy(policy, add_missing_backtrack=True)  # a base model (stage base), as eval does
    problems = load_problems(settings["task"], "test", settings["problems"], seed=settings["seed"])
    metrics = measure(model, tokenizer, problems)
    atomic_write_json(cache, {"settings": settings, "metrics": metrics})
    return metrics


def eval_settings(args: DemoArgs) -> dict:
    """What a stage's cached evaluation (``eval.json``) must match to be reused."""
    settings = {"problems": args.num_eval_problems, "samples": args.num_samples, "seed": args.seed,
                "task": args.eval_task}
    if args.max_new_tokens:
        settings["max_new_tokens"] = args.max_new_tokens
    return settings


def saved_evaluation(args: DemoArgs, folder: Path) -> dict | None:
    """The metrics an earlier run saved for the stage in ``folder`` with the same settings, or None."""
    cache = folder / "eval.json"
    saved = json.loads(cache.read_text()) if cache.exists() else {}
    return saved["metrics"] if saved.get("settings") == eval_settings(args) else None


def evaluate_stage(args: DemoArgs, policy: str | Path, folder: Path) -> dict:
    """The stage's evaluation, cached beside it (``eval.json``) for the same settings."""
    settings = eval_settings(args)
    return cached_metrics(folder / "eval.json", settings, policy, lambda model, tok, problems:
                          evaluate_policy(model, tok, problems, num_samples=args.num_samples, seed=args.seed,
                                          max_new_tokens=args.max_new_tokens or 128))


def equal_token_votes(arm: dict, control: dict) -> int:
    """The k of the control's majority vote at equal tokens: its k sampled answers per problem spend at least the
    actions the backtracking arm's one sampled answer does (self-consistency at equal compute)."""
    spent, each = arm.get("sampled_mean_actions"), control.get("sampled_mean_actions")
    return 1 if not spent or not each else max(1, math.ceil(spent / each))


def majority_stage(args: DemoArgs, policy: str | Path, folder: Path, k: int) -> dict:
    """maj@k of ``policy`` with its backtrack masked (the control is judged without the action), on the
    evaluation problems, cached beside it (``majority.json``) for the same settings."""
    length = args.max_new_tokens or 128
    settings = {"problems": args.num_eval_problems, "k": int(k), "seed": args.seed, "task": args.eval_task,
                "max_new_tokens": length}

    def measure(model, tokenizer, problems):
        prompts = [encode_problem(p, tokenizer)[0] for p in problems]
        return majority_vote(model, tokenizer, prompts, [p.answer for p in problems], int(k), temperature=1.0,
                             seed=args.seed, batch_size=64, max_new_tokens=length, backtrack_bias=float("-inf"))

    return cached_metrics(folder / "majority.json", settings, policy, measure)
