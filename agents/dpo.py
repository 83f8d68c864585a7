"""Token-level DPO at the policy's own error points (``halluc-rl dpo --config configs/dpo_tiny.yaml``).

The pairs (``halluc_rl.pairs``) branch at the first error of the policy's own sampled answers: chosen backtracks
over it, rejected goes on from it; counter-pairs at right states prefer continuing to backtracking. TRL's
``DPOTrainer`` trains on them with its loss types, logging and reference handling, except for one thing: every
log-prob is of an action stream in the policy's semantics, computed by the shared scorer
(``halluc_rl.scoring.score_actions``): in ``rewind`` the chosen side's correction is conditioned on the visible
text, never on the deleted tokens (TRL's concatenated causal forward would be wrong after a backspace); in
``retry`` it follows the error and its backtracks in context.

The reference is TRL's: a LoRA policy started from a saved adapter trains that adapter against a frozen copy of it
(the ``ref`` adapter: no second copy of the base weights); a policy started from a base model trains a new adapter
against the base (the adapter disabled). The pairs can be rebuilt from the current policy every ``rebuild_every``
steps (Step-DPO / RESET-style online iteration), not only once.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
import trl
from transformers import TrainerCallback
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from halluc_rl.adapters import sync_reference_adapter
from halluc_rl.args import (
    LoraArgs,
    ModelArgs,
    PrecisionDefaults,
    RunArgs,
    SamplingArgs,
    SemanticsArgs,
    TaskArgs,
)
from halluc_rl.config import (
    UsageError,
    adopt_semantics,
    check_choice,
    check_model_name,
    check_output_dir,
    check_positive,
    check_task_args,
    cli,
    parse_cli,
)
from halluc_rl.data.tasks import ORACLE_TASKS, load_problems, task_name
from halluc_rl.generation import BacktrackGenerationConfig
from halluc_rl.modeling import load_start_policy
from halluc_rl.pairs import build_pairs, find_errors
from halluc_rl.policy import policy_backtrack
from halluc_rl.scoring import score_actions
from halluc_rl.training import SafeTrainerMixin, run_training


@dataclass
class DPOScriptArgs(RunArgs, SamplingArgs, SemanticsArgs, TaskArgs):
    """Where the pairs come from and what they look like (the task, the sampling temperature and resume settings
    come from the shared blocks)."""

    num_problems: int = field(default=256, metadata={"help": "Train problems the policy answers each round."})
    num_samples: int = field(default=4, metadata={"help": "Sampled answers per problem."})
    max_new_tokens: int = field(default=128, metadata={"help": "Actions per sampled answer."})
    locate: str = field(default="oracle", metadata={
        "help": "How the first error is found: oracle (offline task), mc (a Monte-Carlo value drop) or prm (the "
                "first step a trained PRM, prm_path, scores below prm_threshold)."})
    prm_path: str | None = field(default=None, metadata={
        "help": "locate prm: the PRM's directory (`halluc-rl prm`), on the policy's tokenizer."})
    form: str = field(default="single", metadata={
        "help": "single (one action: <BT> vs the next token) or continuation (backtrack + a right continuation vs "
                "the policy's own)."})
    continuation: str = field(default="reference", metadata={
        "help": "continuation form: reference (the offline task's) or sampled (a successful branch)."})
    counter_ratio: float = field(default=1.0, metadata={
        "help": "Counter-pairs (continue > backtrack at right states) per error pair."})
    weighting: str = field(default="none", metadata={
        "help": "none, or value_drop: resample error pairs in proportion to the value drop at their branch point."})
    mc_branches: int = field(default=8, metadata={"help": "Branches per state for mc errors and sampled continuations."})
    min_drop: float = field(default=0.5, metadata={"help": "mc errors: the value drop that marks a step wrong."})
    prm_threshold: float = field(default=0.5, metadata={"help": "prm errors: a step scored below this is wrong."})
    min_pairs: int = field(default=8, metadata={"help": "Refuse to train on fewer error pairs than this."})
    rebuild_every: int = field(default=0, metadata={
        "help": "Rebuild the pairs from the current policy every N optimiser steps (0: build them once)."})


@dataclass
class DPOConfig(PrecisionDefaults, trl.DPOConfig):
    """TRL's ``DPOConfig``; ``bf16`` defaults to off on a CPU (see :class:`halluc_rl.args.PrecisionDefaults`)."""


@dataclass
class PreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator plus ``floor`` [2B]: each row's problem-prompt length (chosen rows, then rejected)."""

    def torch_call(self, examples):
        out = super().torch_call(examples)
        floors = torch.tensor([e["floor"] for e in examples])
        out["floor"] = torch.cat([floors, floors])  # [2B]
        return out


def _scored_forward(self, *args, fused_lm_head=False, labels=None, floor=None, **kwargs):
    """The base model's forward, where TRL asks for per-token log-probs (``fused_lm_head=True``): the shared scorer's
    log-probs of each row's action stream, placed where TRL's shifted layout expects them (0 elsewhere)."""
    if not fused_lm_head:
        return type(self).forward(self, *args, **kwargs)
    input_ids, attention = kwargs["input_ids"], kwargs["attention_mask"]  # [2B, L]
    completion = labels != -100  # [2B, L]
    lengths = attention.sum(1).tolist()
    starts = completion.float().argmax(1).tolist()  # where each completion begins
    floor = floor.tolist()
    prompts = [input_ids[b, : floor[b]].tolist() for b in range(len(floor))]
    streams = [input_ids[b, floor[b] : lengths[b]] for b in range(len(floor))]
    width = max(len(s) for s in streams)
    actions = torch.full((len(streams), width), -1, dtype=torch.long, device=input_ids.device)  # [2B, S]
    for b, stream in enumerate(streams):
        actions[b, : len(stream)] = stream
    scores = score_actions(self, prompts, actions, self._halluc_scoring)
    shape = (input_ids.shape[0], input_ids.shape[1] - 1)  # TRL's shifted layout: [2B, L-1]
    log_probs = torch.zeros(shape, device=input_ids.device)
    entropy, mean_logits, top1 = torch.zeros_like(log_probs), torch.zeros_like(log_probs), torch.zeros_like(log_probs)
    for b in range(len(floor)):
        first, n = starts[b] - floor[b], lengths[b] - floor[b]  # the completion's actions within the stream
        span = slice(starts[b] - 1, lengths[b] - 1)
        log_probs[b, span] = scores.logprobs[b, first:n]
        entropy[b, span] = scores.entropy[b, first:n].detach()
        mean_logits[b, span] = scores.mean_logit[b, first:n]
        top1[b, span] = scores.top1[b, first:n].float()
    return types.SimpleNamespace(log_probs=log_probs, entropy=entropy, mean_logits=mean_logits, is_top1=top1.bool(),
                                 aux_loss=None)


class BacktrackDPOTrainer(SafeTrainerMixin, DPOTrainer):
    """``DPOTrainer`` on action streams: its log-probs come from the shared scorer (see the module docstring)."""

    def __init__(self, *args, scoring: BacktrackGenerationConfig | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if "ref" in getattr(self.model, "peft_config", {}):
            sync_reference_adapter(self.model)  # TRL's copy misses the backtrack rows
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        base._halluc_scoring = scoring or BacktrackGenerationConfig(loop_guard=None)
        base.forward = types.MethodType(_scored_forward, base)  # replaces TRL's fused LM head, which skips PEFT rows

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # pre-tokenised action streams: TRL's text tokenisation does not apply

    def _set_signature_columns_if_needed(self):
        self._signature_columns = ["prompt_ids", "chosen_ids", "rejected_ids", "floor"]

    def log(self, logs: dict, start_time: float | None = None) -> None:
        source = getattr(self, "pair_source", None)
        logs.update(source.stats if source is not None else {})  # how many pairs of each kind this round has
        super().log(logs, start_time)


class PairSource:
    """The pairs of the current round, rebuilt from the policy on demand; the dataset rows read from here."""

    def __init__(self, script: DPOScriptArgs, model, tokenizer, problems, seed: int):
        self.script, self.model, self.tokenizer, self.problems, self.seed = script, model, tokenizer, problems, seed
        self.rows: list[dict] = []
        self.size = 0
        self.stats: dict[str, float] = {}
        self.prm = None
        if script.locate == "prm":
            from halluc_rl.rewards import HFProcessReward

            try:
                self.prm = HFProcessReward.from_pretrained(script.prm_path, tokenizer)
            except ValueError as err:
                raise UsageError(f"prm_path: {err}") from None

    def rebuild(self, round_: int) -> None:
        s = self.script
        was_training = self.model.training
        self.model.eval()
        config = BacktrackGenerationConfig(do_sample=True, loop_guard=None, temperature=s.temperature,
                                           max_new_tokens=s.max_new_tokens)
        generator = torch.Generator().manual_seed(self.seed * 1000 + round_)
        samples = find_errors(self.model, self.tokenizer, self.problems, num_samples=s.num_samples, locate=s.locate,
                              config=config, generator=generator, mc_branches=s.mc_branches, min_drop=s.min_drop,
                              prm=self.prm, prm_threshold=s.prm_threshold)
        bt, _ = policy_backtrack(self.model)
        pairs = build_pairs(samples, self.tokenizer, bt, form=s.form, continuation=s.continuation, model=self.model,
                            mc_branches=s.mc_branches, config=config, generator=generator,
                            counter_ratio=s.counter_ratio, weighting=s.weighting, seed=self.seed + round_,
                            min_pairs=s.min_pairs)
        self.model.train(was_training)
        rows = [p.as_row() for p in pairs]
        self.size = self.size or len(rows)
        rng = torch.Generator().manual_seed(self.seed + round_)
        self.rows = [rows[i] for i in torch.randint(len(rows), (self.size,), generator=rng).tolist()] \
            if len(rows) != self.size else rows
        errors = sum(r["kind"] == "error" for r in rows)
        self.stats = {"pairs/errors": errors, "pairs/counter": len(rows) - errors,
                      "pairs/error_rate": len(samples.errors) / samples.num_samples}
        print(f"round {round_}: {errors} error pairs and {len(rows) - errors} counter-pairs from "
              f"{samples.num_samples} answers ({len(samples.errors)} with an error)")

    def dataset(self):
        import datasets

        base = datasets.Dataset.from_dict({"index": list(range(self.size))})
        base.set_transform(lambda batch: {k: [self.rows[i][k] for i in batch["index"]] for k in self.rows[0]})
        return base


class RebuildCallback(TrainerCallback):
    """Rebuild the pairs from the current policy every ``every`` steps."""

    def __init__(self, source: PairSource, every: int):
        self.source, self.every = source, every

    def on_step_begin(self, args, state, control, **kwargs):
        if self.every and state.global_step and state.global_step % self.every == 0:
            self.source.rebuild(state.global_step // self.every)



def validate(script: DPOScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: DPOConfig) -> None:
    """Every check that needs no model, before anything is loaded or written (one-line UsageErrors)."""
    check_task_args(script)
    check_choice("locate", script.locate, ("oracle", "mc", "prm"))
    if script.locate == "prm" and not (script.prm_path and Path(script.prm_path).is_dir()):
        raise UsageError(f"prm_path: locate: prm needs a PRM directory (halluc-rl prm writes one); got {script.prm_path}")
    check_choice("form", script.form, ("single", "continuation"))
    check_choice("continuation", script.continuation, ("reference", "sampled"))
    check_choice("weighting", script.weighting, ("none", "value_drop"))
    if task_name(script.task) not in ORACLE_TASKS and (script.locate == "oracle" or script.continuation == "reference"):
        raise UsageError("locate: oracle and continuation: reference need the offline task's unique solutions; use "
                         "locate: mc or prm and continuation: sampled on gsm8k")
    if task_name(script.task) == "deps" and script.form == "continuation" and script.continuation == "reference":
        raise UsageError("continuation: reference needs the arithmetic task's unique solutions (on deps the right "
                         "prefix may take another order than the reference); use continuation: sampled")
    check_positive(script, "num_problems", "num_samples", "temperature", "max_new_tokens", "mc_branches",
                   "min_pairs")
    check_positive(script, "counter_ratio", "rebuild_every", "min_drop", allow_zero=("counter_ratio",
                                                                                     "rebuild_every", "min_drop"))
    check_positive(config, "learning_rate", "per_device_train_batch_size", "beta")
    check_output_dir(config.output_dir)
    if config.dataloader_num_workers > 0:
        raise UsageError("dataloader_num_workers: must be 0: the pairs are rebuilt from the policy in the main process")
    check_model_name(model_args.model_name_or_path)


def build_trainer(script: DPOScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: DPOConfig):
    """The policy (a saved adapter continued, or a base with a new adapter), the first pairs, the trainer."""
    from transformers import set_seed

    set_seed(config.seed)
    model, tokenizer, _ = load_start_policy(model_args.model_name_or_path, lora, model_args.dtype,
                                            config.trust_remote_code, model_args.revision)
    adopt_semantics(model, script)  # the policy's own semantics unless overridden (recorded, saved)
    problems = load_problems(script.task, "train", script.num_problems, script.data_files, seed=script.task_seed,
                             validation_size=script.validation_size)
    source = PairSource(script, model, tokenizer, problems, config.seed)
    source.rebuild(0)
    config.remove_unused_columns = False
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    trainer = BacktrackDPOTrainer(model=model, args=config, train_dataset=source.dataset(), processing_class=tokenizer,
                                  data_collator=collator, callbacks=[RebuildCallback(source, script.rebuild_every)])
    trainer.pair_source = source
    return trainer


def train(script: DPOScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: DPOConfig):
    """Validate, then train (resuming from the newest complete checkpoint in ``output_dir``) and save the policy."""
    def build(resume: str | None):
        trainer = build_trainer(script, model_args, lora, config)
        if resume and script.rebuild_every:  # the pairs of the round the checkpoint was in, from its policy
            trainer.pair_source.rebuild(int(Path(resume).name.split("-")[-1]) // script.rebuild_every)
        return trainer

    return run_training([script, model_args, lora, config], validate, build)


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        parsed = parse_cli([DPOScriptArgs, ModelArgs, LoraArgs, DPOConfig], argv, prog="halluc-rl dpo")
        trainer = train(*parsed)
        margins = [h["rewards/margins"] for h in trainer.state.log_history if "rewards/margins" in h]
        out = parsed[-1].output_dir
        print(f"saved the policy to {out}" + (f"; reward margin {margins[0]:.3f} -> {margins[-1]:.3f}" if margins
                                               else ""))
        return 0

    return cli("halluc-rl dpo", run)


if __name__ == "__main__":
    raise SystemExit(main())
