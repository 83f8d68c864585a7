"""Masked-error SFT: warm-start a policy that backtracks (``halluc-rl sft --config configs/sft_tiny.yaml``).

TRL's ``SFTTrainer`` with the masked-error collator (errors are never trained; backtracks and corrections are),
the backtrack token added and initialised once, a PEFT LoRA policy whose backtrack rows are trainable and saved
with the adapter (or full fine-tuning), and the error curriculum as a trainer callback. Config flows from the
dataclasses below, then ``--config file.yaml``, then ``--key value`` overrides; unknown keys are rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trl
from trl import SFTTrainer

from halluc_rl.adapters import make_lora_model
from halluc_rl.args import (
    LoraArgs,
    ModelArgs,
    PrecisionDefaults,
    RunArgs,
    SamplingArgs,
    SemanticsArgs,
    TaskArgs,
)
from halluc_rl.backtrack import SEMANTICS
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
from halluc_rl.data.collator import MaskedErrorCollator
from halluc_rl.data.curriculum import Curriculum, CurriculumCallback, CurriculumDataset
from halluc_rl.data.deps_errors import DepsSelfErrors, check_error_kinds, plausible_errors
from halluc_rl.data.errors import PLAUSIBLE_KINDS, RandomTokenErrors, SelfGeneratedErrors
from halluc_rl.data.tasks import load_problems
from halluc_rl.losses import BACKTRACK_HEADS, factorized_backtrack_loss
from halluc_rl.modeling import load_model_and_tokenizer
from halluc_rl.policy import policy_backtrack, set_policy_backtrack
from halluc_rl.training import SafeTrainerMixin, run_training


@dataclass
class SFTScriptArgs(RunArgs, SamplingArgs, SemanticsArgs, TaskArgs):
    """What to train on: the errors and how they are laid out (the task, sampling of self errors and resume
    settings come from the shared blocks)."""

    num_train_problems: int = field(default=2000, metadata={"help": "Training problems (0: all of GSM8K's split)."})
    error_source: str = field(default="plausible", metadata={"help": "random, plausible, self or none (plain SFT)."})
    error_rate: float = field(default=0.5, metadata={"help": "Share of examples that get errors."})
    error_kinds: list[str] = field(default_factory=lambda: list(PLAUSIBLE_KINDS), metadata={
        "help": "plausible: the mistakes typed (digit, operator, step, check; check needs a task with check lines, "
                "arithmetic:check=1 or 2; on deps: premature, unneeded, slip, all by default)."})
    error_length_min: int = field(default=1, metadata={"help": "Shortest error, in tokens."})
    error_length_max: int = field(default=2, metadata={"help": "Longest error, in tokens."})
    curriculum_caps: list[int] = field(default_factory=lambda: [2, 5, 10],
                                       metadata={"help": "Most errors per example, stage by stage."})
    curriculum_boundaries: list[int] = field(default_factory=lambda: [1, 2],
                                             metadata={"help": "Epochs (or steps) where the next cap starts."})
    curriculum_unit: str = field(default="epoch", metadata={"help": "epoch or step."})
    train_errors: bool = field(default=False, metadata={
        "help": "retry: also train the error tokens (an ablation: it teaches the model to make them)."})
    backtrack_head: str = field(default="softmax", metadata={
        "help": "softmax (the backtrack token is one more vocabulary entry), factorized (a sigmoid delete-or-not "
                "decision) or calibrated (the softmax in value, the factorized head in its gradient; see "
                "halluc_rl.losses)."})


@dataclass
class SFTConfig(PrecisionDefaults, trl.SFTConfig):
    """TRL's ``SFTConfig``; ``bf16`` defaults to off on a CPU (see :class:`halluc_rl.args.PrecisionDefaults`)."""


class MaskedErrorSFTTrainer(SafeTrainerMixin, SFTTrainer):
    """``SFTTrainer`` whose loss runs through the model's own forward, under the policy's backtrack head.

    TRL 1.16 computes the loss from ``lm_head.weight`` and ``lm_head.bias`` directly (a fused, chunked LM head):
    a plain softmax, which knows nothing of the ``factorized`` backtrack head. The loss here runs through the
    model's own forward and every wrapper (the plain causal-LM loss over the collator's labels, or the factorized
    one); the price is materialising the logits of a batch. The head and the
    backtrack id are read from ``model.config`` (their one home); :class:`~halluc_rl.training.SafeTrainerMixin` stops
    on non-finite values, saves atomically and writes those settings with every copy.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from transformers import Trainer

        backtrack_id, head = policy_backtrack(self.model)
        if head != "softmax":
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = factorized_backtrack_loss(outputs.logits, labels, backtrack_id, num_items_in_batch,
                                             calibrated=head == "calibrated")
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes  # as Trainer.compute_loss does, for DDP's mean
            return (loss, outputs) if return_outputs else loss
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def make_error_source(script: SFTScriptArgs, model, seed: int):
    """The configured error source (``none`` gives clean examples: the plain-SFT baseline on the same data)."""
    lengths = (script.error_length_min, script.error_length_max)
    cap = max(script.curriculum_caps)
    if script.error_source == "none":
        return RandomTokenErrors(error_rate=0.0, max_errors=1, seed=seed)
    if script.error_source == "random":
        return RandomTokenErrors(error_rate=script.error_rate, max_errors=cap, error_length=lengths, seed=seed)
    if script.error_source == "plausible":
        return plausible_errors(script.task, script.error_kinds, error_rate=script.error_rate, max_errors=cap,
                                error_length=lengths, seed=seed)
    if script.error_source == "self" and script.task.partition(":")[0] == "deps":  # located by the oracle
        kinds = [k for k in check_error_kinds(script.task, script.error_kinds) if k != "slip"]  # order kinds
        return DepsSelfErrors(model, kinds, error_rate=script.error_rate, max_errors=1, seed=seed,
                              temperature=script.temperature)
    if script.error_source == "self":
        return SelfGeneratedErrors(model, error_rate=script.error_rate, max_errors=cap, error_length=lengths,
                                   seed=seed, temperature=script.temperature)
    raise ValueError(f"unknown error_source {script.error_source!r}; use random, plausible, self or none")


def curriculum_dataset(curriculum_ds: CurriculumDataset):
    """An HF ``Dataset`` (what SFTTrainer takes) whose rows are built on access from the curriculum dataset, so a
    cap change by the callback changes the examples the trainer sees."""
    import datasets

    base = datasets.Dataset.from_dict({"index": list(range(len(curriculum_ds)))})

    def build(batch: dict) -> dict:
        rows = curriculum_ds.features(batch["index"])
        return {"input_ids": [r["input_ids"] for r in rows], "spans": [r["spans"] for r in rows]}

    base.set_transform(build)
    return base


def build_trainer(script: SFTScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: SFTConfig) -> SFTTrainer:
    """Everything up to ``trainer.train()``: model, tokenizer, LoRA, data, collator and curriculum."""
    from transformers import set_seed

    set_seed(config.seed)  # before the LoRA weights are drawn: the same config gives the same run
    model, tokenizer, bt = load_model_and_tokenizer(
        model_args.model_name_or_path, dtype=model_args.dtype, trust_remote_code=config.trust_remote_code,
        revision=model_args.revision)
    set_policy_backtrack(model, bt, script.backtrack_head)  # the head lives on the config from here on
    semantics = adopt_semantics(model, script)  # so does the semantics: the collator lays examples out in it
    problems = load_problems(script.task, "train", script.num_train_problems, script.data_files, seed=script.task_seed,
                             validation_size=script.validation_size)
    source = make_error_source(script, model, config.seed)
    curriculum = Curriculum(caps=tuple(script.curriculum_caps), boundaries=tuple(script.curriculum_boundaries),
                            unit=script.curriculum_unit)
    curriculum_ds = CurriculumDataset(problems, tokenizer, source, curriculum)
    collator = MaskedErrorCollator(pad_token_id=tokenizer.pad_token_id, backtrack_token_id=bt,
                                   train_errors=script.train_errors, layout=semantics, max_length=config.max_length,
                                   mask_dtype=model.dtype)  # rewind: an additive 4D mask in the model's dtype
    if lora.use_lora:
        model = make_lora_model(model, lora, bt)
    config.remove_unused_columns = False  # the collator needs `spans`
    config.dataset_kwargs = {**(config.dataset_kwargs or {}), "skip_prepare_dataset": True}
    trainer = MaskedErrorSFTTrainer(model=model, args=config, train_dataset=curriculum_dataset(curriculum_ds),
                         processing_class=tokenizer, data_collator=collator,
                         callbacks=[CurriculumCallback(curriculum_ds)])
    return trainer


def validate(script: SFTScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: SFTConfig) -> None:
    """Every check that needs no model, before anything is loaded or written (one-line UsageErrors)."""
    check_task_args(script, script.num_train_problems)
    check_choice("error_source", script.error_source, ("random", "plausible", "self", "none"))
    if script.semantics is not None:
        check_choice("semantics", script.semantics, SEMANTICS)
    if script.train_errors and script.semantics != "retry":
        raise UsageError("train_errors: only the retry semantics has error tokens in its context to train; add "
                         "--semantics retry or drop --train_errors")
    try:
        check_error_kinds(script.task, script.error_kinds or [""])
    except ValueError as err:
        raise UsageError(str(err)) from err
    check_choice("backtrack_head", script.backtrack_head, BACKTRACK_HEADS)
    check_choice("curriculum_unit", script.curriculum_unit, ("epoch", "step"))
    check_positive(script, "num_train_problems", allow_zero=("num_train_problems",))
    check_positive(script, "error_length_min", "error_length_max", "temperature")
    check_positive(config, "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps")
    check_positive(lora, "lora_r", "lora_alpha")
    check_output_dir(config.output_dir)
    if not 0.0 <= script.error_rate <= 1.0:
        raise UsageError(f"error_rate: must be in [0, 1], got {script.error_rate}")
    if not script.curriculum_caps or any(c < 1 for c in script.curriculum_caps):
        raise UsageError(f"curriculum_caps: need a list of positive caps, got {script.curriculum_caps}")
    if len(script.curriculum_boundaries) != len(script.curriculum_caps) - 1:
        raise UsageError(f"curriculum_boundaries: {len(script.curriculum_caps)} caps need "
                         f"{len(script.curriculum_caps) - 1} boundaries, got {script.curriculum_boundaries}")
    if config.dataloader_num_workers > 0:
        raise UsageError("dataloader_num_workers: must be 0: the curriculum's cap lives in the main process "
                         "(workers would keep a stale copy) and self-generated errors sample from the model there")
    check_model_name(model_args.model_name_or_path)


def train(script: SFTScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: SFTConfig) -> SFTTrainer:
    """Validate, then train (resuming from the newest complete checkpoint in ``output_dir``) and save the policy."""
    return run_training([script, model_args, lora, config], validate,
                        lambda resume: build_trainer(script, model_args, lora, config))


def main(argv: list[str] | None = None) -> int:
    def run() -> int:
        parsed = parse_cli([SFTScriptArgs, ModelArgs, LoraArgs, SFTConfig], argv, prog="halluc-rl sft")
        trainer = train(*parsed)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        out = parsed[-1].output_dir
        print(f"saved the policy to {out}; final training loss {losses[-1]:.4f}" if losses else
              f"saved the policy to {out}")
        return 0

    return cli("halluc-rl sft", run)


if __name__ == "__main__":
    raise SystemExit(main())
