"""GRPO with backtracking, for TRL users (``halluc-rl grpo --config configs/grpo_tiny.yaml``).

TRL's ``GRPOTrainer`` and its config habits, with the completion being the policy's *action stream*:

* **sampling**: a ``rollout_func`` runs the backtrack-aware generator (:func:`halluc_rl.rollout.rollout`); a group's
  G episodes branch from one prefilled prompt, and the env's reward plug-ins score them in lock-step;
* **log-probs** (policy, old, reference) come from the shared scorer (:func:`halluc_rl.scoring.score_actions`),
  never TRL's causal forward over the stream, in which deleted tokens would condition later actions. The old ones
  are the sampler's, so the first importance ratio is exactly 1;
* **rewards** are computed in the rollout and passed through (:class:`RolloutReward`); the ``completions`` TRL gives
  any other reward function (and logs) are the visible texts.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field, replace

import torch
import trl
from trl import GRPOTrainer

from halluc_rl.adapters import base_model_name, quiet_checkpointing_alias, sync_reference_adapter
from halluc_rl.args import (
    LoraArgs,
    ModelArgs,
    PrecisionDefaults,
    RewardArgs,
    RunArgs,
    SemanticsArgs,
    TaskArgs,
)
from halluc_rl.backtrack import apply_actions
from halluc_rl.config import (
    UsageError,
    adopt_semantics,
    check_model_name,
    check_output_dir,
    check_positive,
    check_reward_args,
    check_task_args,
    cli,
    parse_cli,
)
from halluc_rl.data.problems import Problem, format_prompt
from halluc_rl.data.tasks import load_problems
from halluc_rl.generation import BacktrackGenerationConfig
from halluc_rl.mixers import build_rewards
from halluc_rl.modeling import load_start_policy
from halluc_rl.policy import policy_backtrack
from halluc_rl.rewards import RewardMixer, RuleGrader
from halluc_rl.rollout import rollout
from halluc_rl.scoring import score_actions
from halluc_rl.training import SafeTrainerMixin, run_training


@dataclass
class GRPOScriptArgs(RunArgs, RewardArgs, SemanticsArgs, TaskArgs):
    """The backtrack decoding rules (the task, the rewards and resume settings come from the shared blocks; the
    sampling temperature is TRL's own ``temperature``)."""

    num_train_problems: int = field(default=2000, metadata={"help": "Training problems (0: all of GSM8K's split)."})
    backtrack_bias: float = field(default=0.0, metadata={"help": "Added to the backtrack logit when sampling."})
    backtrack_budget: int | None = field(default=None, metadata={"help": "Backtracks allowed per episode."})
    loop_guard: int = field(default=3, metadata={
        "help": "Deletions at a position before a token is banned (0: off)."})
    process_advantage_coef: float = field(default=0.0, metadata={
        "help": "Per-token advantages: add this times each action's process reward to its advantage (0: off)."})


@dataclass
class GRPOConfig(PrecisionDefaults, trl.GRPOConfig):
    """TRL's ``GRPOConfig``; ``bf16`` defaults to off on a CPU and dropout is off, so the first ratio is exactly 1."""

    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout (exact importance ratios)."})


class RolloutReward:
    """A TRL reward function reading back a reward part the rollout computed (the episode's sum), logged by TRL under
    its name; ``others_than`` sums every part but those (the shaping terms)."""

    def __init__(self, name: str, others_than: tuple[str, ...] | None = None):
        self.__name__, self.others_than = name, others_than

    def __call__(self, completions: list, reward_parts: list[dict[str, float]], **_) -> list[float]:
        if self.others_than is None:
            return [row.get(self.__name__, 0.0) for row in reward_parts]
        return [sum(v for k, v in row.items() if k not in self.others_than) for row in reward_parts]


def rollout_reward_funcs(mixer: RewardMixer) -> list[RolloutReward]:
    """One :class:`RolloutReward` per plug-in of ``mixer``, plus one for the shaping terms when any is set."""
    names = tuple(r.name for r, _ in mixer.outcome + mixer.process)
    shaping = mixer.shaping.backtrack_cost or mixer.shaping.failed_backtrack_penalty or mixer.shaping.budget_penalty
    return [RolloutReward(n) for n in names] + ([RolloutReward("shaping", names)] if shaping else [])


def problem_dataset(problems: list[Problem], tokenizer):
    """A TRL prompt dataset: ``prompt`` (for TRL's logs) plus the fields the reward plug-ins read."""
    import datasets

    return datasets.Dataset.from_dict({
        "prompt": [format_prompt(p.question, tokenizer) for p in problems],
        "question": [p.question for p in problems], "solution": [p.solution for p in problems],
        "answer": [p.answer for p in problems]})


def _group_size(rows: list[Problem]) -> int:
    """The length shared by all runs of equal neighbours (TRL lays a group's copies side by side), else 1."""
    runs = {len(list(run)) for _, run in itertools.groupby(rows)}
    return runs.pop() if len(runs) == 1 else 1


def backtrack_rollout(prompts: list, trainer: BacktrackGRPOTrainer) -> dict[str, list]:
    """TRL's ``rollout_func``: action streams from the backtrack-aware generator, scored by the env's plug-ins.

    Returns TRL's ``prompt_ids``, ``completion_ids`` (actions, backtracks included) and ``logprobs`` (sampling), plus
    ``visible_text``, ``reward_parts`` (name -> episode sum) and ``process_rewards`` (per action) for the rewards.
    """
    rows = trainer._rollout_rows
    if rows is None or len(rows) != len(prompts):
        raise RuntimeError("backtrack_rollout needs the batch's dataset rows; use it through BacktrackGRPOTrainer")
    problems = [Problem(r["question"], r["solution"], r["answer"]) for r in rows]
    group = _group_size(problems)
    model = trainer.accelerator.unwrap_model(trainer.model)
    out = rollout(model, trainer.processing_class, problems[::group], trainer.reward_mixer,
                  trainer.backtrack_config, num_samples=group)
    mask = out.action_mask  # [B, S]
    process = out.process_rewards  # [B, S]

    def rows_of(t: torch.Tensor) -> list[list]:
        return [t[b][mask[b]].tolist() for b in range(t.shape[0])]

    return {"prompt_ids": out.prompt_ids, "completion_ids": rows_of(out.actions), "logprobs": rows_of(out.logprobs),
            "visible_text": out.texts, "process_rewards": rows_of(process),
            "reward_parts": [{n: float(p[b].sum()) for n, p in out.reward_parts.items()} for b in range(len(rows))]}


def split_streams(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int):
    """TRL's ``[prompt | completion]`` batch back into prompt id lists and actions [B, K] (-1 padding)."""
    prompt, seen = input_ids[:, :-logits_to_keep], attention_mask[:, :-logits_to_keep].bool()
    prompts = [prompt[b][seen[b]].tolist() for b in range(input_ids.shape[0])]
    actions = input_ids[:, -logits_to_keep:].masked_fill(attention_mask[:, -logits_to_keep:] == 0, -1)
    return prompts, actions


class BacktrackGRPOTrainer(SafeTrainerMixin, GRPOTrainer):
    """``GRPOTrainer`` on action streams. ``rewards``: the env's plug-ins (default: the rule grader); ``reward_funcs``:
    extra TRL reward functions (they get visible texts); ``generation_config``: the backtrack decoding rules (length
    and temperature come from ``args``); ``process_advantage_coef`` > 0 adds each action's process reward to its
    advantage. Stops (exit 3) on a dead gradient, a collapsed policy included (``training.DeadGradientStop``, from
    the mixin, fed the largest action entropy of the loss's batch). Overrides TRL 1.16's
    ``_get_per_token_logps_and_entropies`` (every log-prob; the reference's inside TRL's adapter context), ``_generate`` (its 4th output, the completions) and ``_generate_and_score_completions``.
    """

    def __init__(self, model, args: GRPOConfig, train_dataset, processing_class, *, rewards: RewardMixer | None = None,
                 reward_funcs: list | None = None, generation_config: BacktrackGenerationConfig | None = None,
                 process_advantage_coef: float = 0.0, **kwargs):
        check_exact_sampling(args)
        self.reward_mixer = rewards or RewardMixer([RuleGrader()])
        self.backtrack_config = replace(generation_config or BacktrackGenerationConfig(), do_sample=True, top_k=0,
                                        top_p=1.0, temperature=args.temperature,
                                        max_new_tokens=args.max_completion_length)
        self.process_advantage_coef = process_advantage_coef
        self._rollout_rows: list[dict] | None = None
        with warnings.catch_warnings():  # rollout_func is experimental in TRL; here it is ours, not the user's
            warnings.filterwarnings("ignore", message=".*'rollout_func'")
            super().__init__(model, rollout_reward_funcs(self.reward_mixer) + list(reward_funcs or ()), args,
                             train_dataset, processing_class=processing_class, rollout_func=backtrack_rollout, **kwargs)
        if self.aux_loss_enabled:
            raise ValueError("the action-stream scorer returns no MoE load-balancing loss; set router_aux_loss_coef: 0")
        model = self.accelerator.unwrap_model(self.model)
        if "ref" in getattr(model, "peft_config", {}):
            sync_reference_adapter(model)  # TRL's copy misses the trainable-token (backtrack) rows

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **_):
        """Per-action log-probs and entropies [B, K] from the shared scorer under the sampling rules: each action
        sees only the visible text it was chosen from (TRL's causal forward would let deleted tokens condition it)."""
        prompts, actions = split_streams(input_ids, attention_mask, logits_to_keep)
        size = batch_size or len(prompts)
        logps, entropies = [], []
        for start in range(0, len(prompts), size):
            with self.accelerator.autocast():
                scores = score_actions(model, prompts[start:start + size], actions[start:start + size],
                                       self.backtrack_config)
            logps.append(scores.logprobs)
            entropies.append(scores.entropy)
        if compute_entropy and torch.is_grad_enabled():  # the loss's pass: the dead-gradient stop reads it
            self._last_entropy = float(torch.cat(entropies).max())  # 0 only if every action is certain
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, None

    def _generate(self, prompts: list):
        """TRL's generation step, with the completions (what reward functions get and TRL logs) as visible texts."""
        out = list(super()._generate(prompts))
        bt, _ = policy_backtrack(self.accelerator.unwrap_model(self.model))
        out[3] = self.processing_class.batch_decode([apply_actions(ids, bt).visible_ids for ids in out[1]],
                                                    skip_special_tokens=True)
        return tuple(out)

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        """TRL's batch, with the sampling log-probs as the old ones and, optionally, per-token advantages."""
        self._rollout_rows = inputs  # the rollout_func reads the problems from the batch's rows
        try:
            with quiet_checkpointing_alias():  # TRL calls model.*gradient_checkpointing* (deprecated) in here
                out = super()._generate_and_score_completions(inputs)
        finally:
            self._rollout_rows = None
        out["old_per_token_logps"] = out["sampling_per_token_logps"]  # pi_old is the sampler, exactly
        if self.process_advantage_coef:
            mask = out["completion_mask"]  # [B, K]
            process = torch.zeros(mask.shape, device=mask.device)
            for b, row in enumerate(inputs):
                process[b, : len(row["process_rewards"])] = torch.tensor(row["process_rewards"])
            out["advantages"] = out["advantages"].unsqueeze(1) + self.process_advantage_coef * process * mask
        return out


def check_exact_sampling(args: trl.GRPOConfig) -> None:
    """Refuse options under which the sampling log-probs would not be the scorer's (exact ratios need them off)."""
    if args.top_k not in (0, None) or args.top_p != 1.0 or args.min_p is not None or args.repetition_penalty != 1.0:
        raise UsageError("top_k, top_p, min_p, repetition_penalty: the backtrack sampler scores actions under "
                         "softmax(logits / temperature) only; leave them at 0, 1.0, null, 1.0")
    if args.use_vllm or args.use_transformers_continuous_batching:
        raise UsageError("use_vllm / use_transformers_continuous_batching: action streams are sampled by the "
                         "backtrack-aware generator; turn them off")


def validate(script: GRPOScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: GRPOConfig) -> None:
    """Every check that needs no model, before anything is loaded or written (one-line UsageErrors)."""
    check_task_args(script, script.num_train_problems)
    check_reward_args(script, script.task)
    check_positive(script, "num_train_problems", "backtrack_budget", "loop_guard",
                   allow_zero=("num_train_problems", "backtrack_budget", "loop_guard"))
    check_positive(config, "learning_rate", "per_device_train_batch_size", "max_completion_length", "temperature")
    check_positive(config, "beta", allow_zero=("beta",))  # a negative beta flips the KL penalty into a bonus
    check_output_dir(config.output_dir)
    check_positive(lora, "lora_r", "lora_alpha")
    check_exact_sampling(config)
    if script.process_advantage_coef and script.process_reward == "none":
        raise UsageError("process_advantage_coef: no process reward is configured; set process_reward too")
    if config.beta and not lora.use_lora:
        raise UsageError("beta: TRL 1.16 reloads a full fine-tune's reference from the model id, without the "
                         "backtrack row; use use_lora: true (the reference is then the starting adapter) or beta: 0")
    if base_model_name(model_args.model_name_or_path) is not None and not lora.use_lora:
        raise UsageError("use_lora: the starting policy is an adapter, which GRPO goes on training; set it to true")
    check_model_name(model_args.model_name_or_path)


def build_trainer(script: GRPOScriptArgs, model_args: ModelArgs, lora: LoraArgs,
                  config: GRPOConfig) -> BacktrackGRPOTrainer:
    """Everything up to ``trainer.train()``: the starting policy, the prompts, the rewards and the decoding rules."""
    from transformers import set_seed

    set_seed(config.seed)  # before the LoRA weights are drawn: the same config gives the same run
    model, tokenizer, _ = load_start_policy(model_args.model_name_or_path, lora, model_args.dtype,
                                            config.trust_remote_code, model_args.revision)
    adopt_semantics(model, script)  # the policy's own semantics unless overridden (recorded, saved)
    problems = load_problems(script.task, "train", script.num_train_problems, script.data_files,
                             seed=script.task_seed, validation_size=script.validation_size)
    decoding = BacktrackGenerationConfig(backtrack_bias=script.backtrack_bias, backtrack_budget=script.backtrack_budget,
                                         loop_guard=script.loop_guard)
    return BacktrackGRPOTrainer(model, config, problem_dataset(problems, tokenizer), tokenizer,
                                rewards=build_rewards(script, tokenizer), generation_config=decoding,
                                process_advantage_coef=script.process_advantage_coef)


def train(script: GRPOScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: GRPOConfig) -> BacktrackGRPOTrainer:
    """Validate, then train (resuming from the newest complete checkpoint in ``output_dir``) and save the policy."""
    return run_training([script, model_args, lora, config], validate,
                        lambda resume: build_trainer(script, model_args, lora, config))


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        parsed = parse_cli([GRPOScriptArgs, ModelArgs, LoraArgs, GRPOConfig], argv, prog="halluc-rl grpo")
        rewards = [h["reward"] for h in train(*parsed).state.log_history if "reward" in h]
        last = f"; last mean reward {rewards[-1]:.4f}" if rewards else ""
        print(f"saved the policy to {parsed[-1].output_dir}{last}")
        return 0

    return cli("halluc-rl grpo", run)


if __name__ == "__main__":
    raise SystemExit(main())
