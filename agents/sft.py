"""Masked-error SFT: warm-start a policy that backtracks (``halluc-rl sft --config configs/sft_tiny.yaml``).

TRL's ``SFTTrainer`` with the masked-error collator (errors are never trained; backtracks and corrections are),
the backtrack token added and initialised once, a PEFT LoRA policy whose backtrack rows are trainable and saved
with the adapter (or full fine-tuning), and the error curriculum as a trainer callback. Config flows from the
dataclasses below, then ``--config file.yaml``, then ``--key value`` overrides; unknown keys are rejected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from trl import SFTConfig, SFTTrainer

from halluc_rl.config import LoraArgs, ModelArgs, parse_config, save_config
from halluc_rl.data.collator import MaskedErrorCollator
from halluc_rl.data.curriculum import Curriculum, CurriculumCallback, CurriculumDataset
from halluc_rl.data.errors import PlausibleErrors, RandomTokenErrors, SelfGeneratedErrors
from halluc_rl.data.tasks import load_problems
from halluc_rl.losses import check_head, factorized_backtrack_loss
from halluc_rl.modeling import (
    check_same_base,
    load_model_and_tokenizer,
    make_lora_model,
    policy_backtrack,
    set_policy_backtrack,
    write_policy_config,
)


@dataclass
class SFTScriptArgs:
    """What to train on: the task, the errors and how they are laid out."""

    task: str = field(default="arithmetic", metadata={"help": "arithmetic (offline) or gsm8k."})
    data_files: str | None = field(default=None, metadata={"help": "Local GSM8K jsonl/parquet path (None: the Hub)."})
    num_train_problems: int = field(default=2000, metadata={"help": "Training problems (0: all of GSM8K's split)."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the arithmetic task."})
    error_source: str = field(default="plausible", metadata={"help": "random, plausible, self or none (plain SFT)."})
    error_rate: float = field(default=0.5, metadata={"help": "Share of examples that get errors."})
    error_length_min: int = field(default=1, metadata={"help": "Shortest error, in tokens."})
    error_length_max: int = field(default=2, metadata={"help": "Longest error, in tokens."})
    self_error_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of self errors."})
    curriculum_caps: list[int] = field(default_factory=lambda: [2, 5, 10],
                                       metadata={"help": "Most errors per example, stage by stage."})
    curriculum_boundaries: list[int] = field(default_factory=lambda: [1, 2],
                                             metadata={"help": "Epochs (or steps) where the next cap starts."})
    curriculum_unit: str = field(default="epoch", metadata={"help": "epoch or step."})
    layout: str = field(default="rewind", metadata={"help": "rewind (what generation sees) or retry (in-context)."})
    train_errors: bool = field(default=False, metadata={"help": "retry layout: also train the error tokens (ablation)."})
    hard_attention: bool = field(default=False, metadata={"help": "retry layout: hide deleted groups."})
    rewind_positions: bool = field(default=False, metadata={"help": "retry layout: positions rewind over deletions."})
    backtrack_head: str = field(default="softmax", metadata={
        "help": "softmax (the backtrack token is one more vocabulary entry) or factorized (a sigmoid delete-or-not "
                "decision; see halluc_rl.losses)."})
    resume: bool = field(default=True, metadata={
        "help": "Resume from the newest checkpoint in output_dir when there is one (false: start afresh)."})


class MaskedErrorSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss runs through the model's own forward, under the policy's backtrack head.

    TRL 1.16 computes the loss from ``lm_head.weight`` directly (a fused, chunked LM head). That bypasses PEFT's
    trainable-token rows on the head, so the backtrack logit would never be trained (and the untied-head wrapper
    has no ``bias``, which that path reads). The plain causal-LM loss over the collator's labels is the same
    quantity, computed through every wrapper; the price is materialising the logits of a batch. The head and the
    backtrack id are read from ``model.config`` (their one home), and every save writes them with the policy.
    """

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            write_policy_config(self.model, output_dir or self.args.output_dir)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from transformers import Trainer

        backtrack_id, head = policy_backtrack(self.model)
        if head == "factorized":
            inputs = dict(inputs)
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = factorized_backtrack_loss(outputs.logits, labels, backtrack_id, num_items_in_batch)
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
        return PlausibleErrors(error_rate=script.error_rate, max_errors=cap, error_length=lengths, seed=seed)
    if script.error_source == "self":
        return SelfGeneratedErrors(model, error_rate=script.error_rate, max_errors=cap, error_length=lengths,
                                   seed=seed, temperature=script.self_error_temperature)
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


def last_checkpoint(output_dir: str) -> str | None:
    """The newest ``checkpoint-N`` under ``output_dir`` (None if there is none)."""
    ckpts = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return str(max(ckpts, key=lambda p: int(p.name.split("-")[-1]))) if ckpts else None


def build_trainer(script: SFTScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: SFTConfig) -> SFTTrainer:
    """Everything up to ``trainer.train()``: model, tokenizer, LoRA, data, collator and curriculum."""
    from transformers import set_seed

    if config.dataloader_num_workers > 0:
        raise ValueError(
            "dataloader_num_workers must be 0: the curriculum's cap lives in the main process (workers would keep "
            "a stale copy) and self-generated errors sample from the model there"
        )
    check_head(script.backtrack_head)
    set_seed(config.seed)  # before the LoRA weights are drawn: the same config gives the same run
    model, tokenizer, bt = load_model_and_tokenizer(
        model_args.model_name_or_path, dtype=model_args.dtype, trust_remote_code=config.trust_remote_code,
        revision=model_args.revision)
    set_policy_backtrack(model, bt, script.backtrack_head)  # the head lives on the config from here on
    problems = load_problems(script.task, "train", script.num_train_problems, script.data_files, seed=script.task_seed)
    source = make_error_source(script, model, config.seed)
    curriculum = Curriculum(caps=tuple(script.curriculum_caps), boundaries=tuple(script.curriculum_boundaries),
                            unit=script.curriculum_unit)
    curriculum_ds = CurriculumDataset(problems, tokenizer, source, curriculum)
    collator = MaskedErrorCollator(pad_token_id=tokenizer.pad_token_id, backtrack_token_id=bt,
                                   train_errors=script.train_errors,
                                   layout=script.layout, hard_attention=script.hard_attention,
                                   rewind_positions=script.rewind_positions, max_length=config.max_length,
                                   mask_dtype=model.dtype)  # an additive 4D mask in the model's dtype (bf16 on GPU)
    if lora.use_lora:
        model = make_lora_model(model, lora, bt)
    config.remove_unused_columns = False  # the collator needs `spans`
    config.dataset_kwargs = {**(config.dataset_kwargs or {}), "skip_prepare_dataset": True}
    trainer = MaskedErrorSFTTrainer(model=model, args=config, train_dataset=curriculum_dataset(curriculum_ds),
                         processing_class=tokenizer, data_collator=collator,
                         callbacks=[CurriculumCallback(curriculum_ds)])
    return trainer


def train(script: SFTScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: SFTConfig) -> SFTTrainer:
    """Train (resuming from the newest checkpoint in ``output_dir`` when there is one) and save the policy."""
    save_config(Path(config.output_dir) / "config.yaml", script, model_args, lora, config)
    resume = config.resume_from_checkpoint
    if resume is None and script.resume:
        resume = last_checkpoint(config.output_dir)
    if resume:
        check_same_base(resume, model_args.model_name_or_path)
    trainer = build_trainer(script, model_args, lora, config)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(config.output_dir)  # the adapter (with the backtrack rows) or the full model
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(config.output_dir)
        history = Path(config.output_dir) / "log_history.json"
        history.write_text(json.dumps(trainer.state.log_history, indent=1))
    return trainer


def main(argv: list[str] | None = None) -> int:
    script, model_args, lora, config = parse_config([SFTScriptArgs, ModelArgs, LoraArgs, SFTConfig], argv)
    trainer = train(script, model_args, lora, config)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"saved the policy to {config.output_dir}; final training loss {losses[-1]:.4f}" if losses else
          f"saved the policy to {config.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
