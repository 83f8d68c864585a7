"""Process reward models: train one on step labels (``halluc-rl prm --config configs/prm_tiny.yaml``) and compare
PRMs on held-out labels (``halluc-rl prm eval --policy runs/sft_bt --prm runs/prm_tiny``).

Training: the policy's own answers to train problems, labelled per step (Monte-Carlo labels by default, see
:mod:`halluc_rl.labels`; cached in ``output_dir/labels-train``), teach a token-classification model initialised
from the policy's base model (the backbone's weights, a new head): two labels trained with cross-entropy on the
hard labels, or one logit trained with binary cross-entropy on the soft labels, at each step's last token (-100
elsewhere), LoRA or full, with the transformers ``Trainer`` and the shared run machinery. A LoRA PRM is merged
before the final save, so ``output_dir`` holds a plain model that loads as it is::

    prm = HFProcessReward.from_pretrained("runs/prm_tiny", tokenizer, step_token_ids=step_token_ids(tokenizer))

Evaluation: the policy's samples on test problems with oracle step labels; each PRM's step-level ROC AUC and
first-error F1 (:func:`halluc_rl.labels.evaluate_step_scores`), written to ``output_dir/results.{json,md}``.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from halluc_rl.adapters import base_model_name
from halluc_rl.args import LoraArgs, ModelArgs, RunArgs, SamplingArgs, TaskArgs
from halluc_rl.atomic import atomic_write_json, atomic_write_text
from halluc_rl.config import (
    UsageError,
    check_choice,
    check_device,
    check_model_name,
    check_output_dir,
    check_positive,
    check_task_args,
    cli,
    parse_cli,
)
from halluc_rl.data.tasks import ORACLE_TASKS, load_problems, task_name
from halluc_rl.labels import (
    LabelSettings,
    StepLabelCollator,
    evaluate_step_scores,
    implicit_step_scores,
    prm_step_scores,
    step_labels,
    step_loss,
    training_rows,
)
from halluc_rl.modeling import DTYPES, load_policy, load_tokenizer
from halluc_rl.policy import set_policy_backtrack
from halluc_rl.registry import resolve_model_path
from halluc_rl.reporting import cell, markdown_table
from halluc_rl.rewards import HFProcessReward, ImplicitProcessReward, tokenizer_mismatch
from halluc_rl.training import SafeTrainerMixin, run_training

HEADS = ("classification", "scalar")
LABEL_TYPES = ("mc", "oracle")


@dataclass
class LabelArgs(SamplingArgs, TaskArgs):
    """Which problems the policy answers and how its steps are labelled (see :class:`halluc_rl.labels.LabelSettings`;
    the task and the sampling temperature come from the shared blocks)."""

    policy: str = field(default="tiny", metadata={"help": "The policy whose answers are labelled (a saved policy or tiny)."})
    samples_per_problem: int = field(default=4, metadata={"help": "Answers sampled from the policy per problem."})
    mc_k: int = field(default=8, metadata={"help": "Monte-Carlo continuations per step (0: no MC labels)."})
    label_seed: int = field(default=0, metadata={"help": "Seeds the answers and continuations."})
    max_new_tokens: int = field(default=128, metadata={"help": "Actions per sampled answer."})
    mc_max_new_tokens: int = field(default=128, metadata={"help": "Actions per continuation."})
    label_batch_size: int = field(default=256, metadata={"help": "Rows decoded together while labelling."})
    label_cache: str | None = field(default=None, metadata={
        "help": "Where the labels are cached (default: output_dir/labels-<split>); a cache made by another policy, "
                "task or setting is refused."})
    device: str = field(default="auto", metadata={"help": "Where the policy labels: cpu, cuda, or auto."})

    def settings(self, oracle: bool) -> LabelSettings:
        return LabelSettings(samples_per_problem=self.samples_per_problem, k=self.mc_k, oracle=oracle,
                             seed=self.label_seed, temperature=self.temperature,
                             max_new_tokens=self.max_new_tokens, mc_max_new_tokens=self.mc_max_new_tokens,
                             batch_size=self.label_batch_size)


@dataclass
class PRMScriptArgs(RunArgs, LabelArgs):
    """What the PRM learns from, and its head (``model_name_or_path`` is the PRM's starting model)."""

    num_train_problems: int = field(default=200, metadata={"help": "Train problems the policy answers."})
    head: str = field(default="classification", metadata={
        "help": "classification (2 labels, cross-entropy on hard labels) or scalar (1 logit, BCE on soft labels)."})
    label_type: str = field(default="mc", metadata={"help": "mc (Monte-Carlo labels) or oracle (arithmetic only)."})
    max_length: int = field(default=512, metadata={"help": "Longest prompt + answer trained on (tokens)."})


@dataclass
class PRMEvalArgs(LabelArgs):
    """Held-out labels (the policy's answers to test problems, oracle step labels) and the PRMs compared."""

    split: str = field(default="test", metadata={"help": "Problems answered: train, validation or test."})
    num_problems: int = field(default=100, metadata={"help": "Problems answered."})
    prm: list[str] = field(default_factory=list, metadata={"help": "Trained PRM directories (halluc-rl prm)."})
    prm_threshold: float = field(default=0.5, metadata={"help": "A trained PRM's step is an error below this."})
    mc_threshold: float = field(default=0.5, metadata={"help": "An MC-labelled step is an error below this share."})
    implicit_policy: str | None = field(default=None, metadata={"help": "A PEFT (DPO) policy: the implicit PRM."})
    implicit_beta: float = field(default=0.1, metadata={"help": "The implicit PRM's beta (the DPO beta)."})
    implicit_threshold: float = field(default=0.0, metadata={"help": "An implicit step is an error below this."})
    output_dir: str = field(default="runs/prm_eval", metadata={"help": "results.json and results.md go here."})


@dataclass
class PRMConfig(TrainingArguments):
    """transformers' ``TrainingArguments``, with a default ``output_dir`` and TRL's ``trust_remote_code``."""

    output_dir: str = field(default="runs/prm", metadata={"help": "Where the PRM, its checkpoints and labels go."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Run a model's own code (off: safe)."})


def _device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else "cpu" if name == "auto" else name)


def validate_labels(args: LabelArgs) -> None:
    check_task_args(args, split=getattr(args, "split", "train"))
    check_positive(args, "samples_per_problem", "temperature", "max_new_tokens", "mc_max_new_tokens",
                   "label_batch_size")
    check_positive(args, "mc_k", allow_zero=("mc_k",))
    check_device(args.device)
    check_model_name(args.policy, "policy")


def policy_labels(args: LabelArgs, split: str, num_problems: int, oracle: bool, cache: Path):
    """The policy's answers to ``num_problems`` problems of ``split``, labelled per step (cached at ``cache``)."""
    policy, tokenizer, bt = load_policy(args.policy)
    policy.to(_device(args.device))
    problems = load_problems(args.task, split, num_problems, args.data_files, seed=args.task_seed,
                             validation_size=args.validation_size)
    task = {"task": args.task, "split": split, "task_seed": args.task_seed, "data_files": args.data_files}
    try:
        labels = step_labels(policy, tokenizer, problems, args.settings(oracle), task=task, cache=cache)
    except torch.OutOfMemoryError as err:
        raise UsageError(f"label_batch_size: {args.label_batch_size} rows do not fit; lower it") from err
    return labels, tokenizer, bt


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


class PRMTrainer(SafeTrainerMixin, Trainer):
    """``Trainer`` with :func:`step_loss`; a LoRA PRM's final save is merged into a plain model (checkpoints stay
    adapters, so resume works as in every trainer)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a mean per batch; Trainer scales it for accumulation
        self._final_save = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss = step_loss(outputs.logits, inputs["labels"])
        return (loss, outputs) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._final_save = not _internal_call
        try:
            super().save_model(output_dir, _internal_call)
        finally:
            self._final_save = False

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        from peft import PeftModel

        if not (self._final_save and isinstance(self.model, PeftModel)):
            return super()._save(output_dir, state_dict)
        adapter = self.model
        self.model = copy.deepcopy(adapter).merge_and_unload()  # a plain model: loads without PEFT or its base
        try:
            super()._save(output_dir, None)
        finally:
            self.model = adapter


def check_prm_init(name: str, policy: str, trust_remote_code: bool) -> None:
    """Refuse a starting model that is an adapter, or whose tokenizer is not the policy's (before any labelling)."""
    base = base_model_name(resolve_model_path(name))
    if base is not None:
        raise UsageError(f"model_name_or_path: {name} is a PEFT adapter; give its base model ({base}) or a full "
                         "model directory")
    mismatch = tokenizer_mismatch(load_tokenizer(name, trust_remote_code=trust_remote_code),
                                  load_tokenizer(policy, trust_remote_code=trust_remote_code))
    if mismatch:
        raise UsageError(f"model_name_or_path: {name}'s tokenizer is not the policy's ({policy}): {mismatch}; start "
                         "the PRM from a model that shares the policy's tokenizer (its base model)")


def load_prm_init(model_args: ModelArgs, head: str, policy_tokenizer, backtrack_id: int, trust_remote_code: bool):
    """The PRM's starting point: ``model_name_or_path``'s backbone with a new 1- or 2-label head."""
    from transformers import AutoModelForTokenClassification

    name = model_args.model_name_or_path
    labels = {0: "wrong", 1: "right"} if head == "classification" else {0: "value"}
    dtype = model_args.dtype if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    model = AutoModelForTokenClassification.from_pretrained(
        resolve_model_path(name), num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()},
        dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, revision=model_args.revision)
    if model.get_input_embeddings().weight.shape[0] < len(policy_tokenizer):
        model.resize_token_embeddings(len(policy_tokenizer), mean_resizing=False)
    set_policy_backtrack(model, backtrack_id)  # records the tokenizer's backtrack id (saved with every copy)
    return model


def lora_prm(model, lora: LoraArgs):
    """LoRA on the backbone; the new head is trained in full (PEFT's TOKEN_CLS task saves it with the adapter)."""
    from peft import LoraConfig, get_peft_model

    targets = [m for m in lora.lora_target_modules if any(n.endswith(m) for n, _ in model.named_modules())]
    if not targets:
        raise UsageError(f"lora_target_modules: none of {lora.lora_target_modules} exists in {type(model).__name__}")
    return get_peft_model(model, LoraConfig(r=lora.lora_r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                                            target_modules=targets, task_type="TOKEN_CLS"))


def validate(script: PRMScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: PRMConfig) -> None:
    """Every check that needs no model, before anything is loaded or written (one-line UsageErrors)."""
    validate_labels(script)
    check_choice("head", script.head, HEADS)
    check_choice("dtype", model_args.dtype, DTYPES)
    check_choice("label_type", script.label_type, LABEL_TYPES)
    check_positive(script, "num_train_problems", "max_length")
    check_positive(config, "learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps")
    check_positive(lora, "lora_r", "lora_alpha")
    check_output_dir(config.output_dir)
    if script.label_type == "mc" and script.mc_k == 0:
        raise UsageError("mc_k: Monte-Carlo labels need mc_k > 0 continuations per step (or label_type: oracle)")
    if script.label_type == "oracle" and task_name(script.task) not in ORACLE_TASKS:
        raise UsageError(f"label_type: oracle labels need the arithmetic or deps task, not {script.task}")
    check_model_name(model_args.model_name_or_path)


def build_trainer(script: PRMScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: PRMConfig) -> PRMTrainer:
    """Labels (made or reused), the PRM, its data and the trainer: everything up to ``trainer.train()``."""
    from transformers import set_seed

    check_prm_init(model_args.model_name_or_path, script.policy, config.trust_remote_code)
    cache = Path(script.label_cache or Path(config.output_dir) / "labels-train")
    labels, tokenizer, bt = policy_labels(script, "train", script.num_train_problems,
                                          oracle=task_name(script.task) in ORACLE_TASKS, cache=cache)
    rows = training_rows(labels, script.head, script.label_type, script.max_length)
    if len(rows) == 0:
        raise UsageError("the policy's answers hold no step to train on; sample more (num_train_problems)")
    set_seed(config.seed)  # before the head and LoRA weights are drawn
    model = load_prm_init(model_args, script.head, tokenizer, bt, config.trust_remote_code)
    if lora.use_lora:
        model = lora_prm(model, lora)
    config.remove_unused_columns = False
    config.label_names = ["labels"]
    return PRMTrainer(model=model, args=config, train_dataset=rows, processing_class=tokenizer,
                      data_collator=StepLabelCollator(tokenizer.pad_token_id))


def train(script: PRMScriptArgs, model_args: ModelArgs, lora: LoraArgs, config: PRMConfig) -> PRMTrainer:
    """Validate, then train (resuming from the newest complete checkpoint in ``output_dir``) and save the PRM."""
    return run_training([script, model_args, lora, config], validate,
                        lambda resume: build_trainer(script, model_args, lora, config))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------

COLUMNS = ("auc", "f1", "acc_error", "acc_correct", "threshold", "seconds")


def evaluate(args: PRMEvalArgs) -> dict[str, dict]:
    """Every PRM's AUC and first-error F1 on the held-out labels; written to ``output_dir/results.{json,md}``."""
    validate_labels(args)
    check_choice("split", args.split, ("train", "validation", "test"))
    check_positive(args, "num_problems", "implicit_beta")
    check_output_dir(args.output_dir)
    if task_name(args.task) not in ORACLE_TASKS:
        raise UsageError(f"task: held-out oracle labels need the arithmetic or deps task, not {args.task}")
    for path in [*args.prm, *([args.implicit_policy] if args.implicit_policy else [])]:
        check_model_name(path, "prm" if path in args.prm else "implicit_policy")
    cache = Path(args.label_cache or Path(args.output_dir) / f"labels-{args.split}")
    labels, tokenizer, _ = policy_labels(args, args.split, args.num_problems, oracle=True, cache=cache)
    truth = labels["oracle"]
    results = {"oracle": evaluate_step_scores([[float(v) for v in row] for row in truth], truth, 0.5)}
    if args.mc_k:
        results["mc"] = evaluate_step_scores(labels["mc_soft"], truth, args.mc_threshold)
    for path in args.prm:
        try:
            prm = HFProcessReward.from_pretrained(path, tokenizer)
        except ValueError as err:
            raise UsageError(f"prm: {err}") from err
        began = time.perf_counter()
        scores = prm_step_scores(prm, labels)
        name = Path(path).name if Path(path).name not in results else path
        results[name] = {**evaluate_step_scores(scores, truth, args.prm_threshold),
                                    "seconds": round(time.perf_counter() - began, 2)}
    if args.implicit_policy:
        policy, implicit_tokenizer, _ = load_policy(args.implicit_policy)
        mismatch = tokenizer_mismatch(implicit_tokenizer, tokenizer)
        if mismatch:
            raise UsageError(f"implicit_policy: {args.implicit_policy}'s tokenizer is not {args.policy}'s: {mismatch}")
        try:
            implicit = ImplicitProcessReward(policy, args.implicit_beta)
        except TypeError as err:
            raise UsageError(f"implicit_policy: {err}") from err
        began = time.perf_counter()
        scores = implicit_step_scores(implicit, labels)
        results["implicit"] = {**evaluate_step_scores(scores, truth, args.implicit_threshold),
                               "seconds": round(time.perf_counter() - began, 2)}
    write_results(results, args, len(labels))
    return results


def write_results(results: dict[str, dict], args: PRMEvalArgs, samples: int) -> None:
    """``results.json`` and ``results.md`` (what was labelled, then one table row per PRM), also printed."""
    out = Path(args.output_dir)
    atomic_write_json(out / "results.json", results)
    first = next(iter(results.values()))
    table = markdown_table(["PRM", *COLUMNS], [[name, *(cell(c, row.get(c)) for c in COLUMNS)]
                                               for name, row in results.items()])
    text = (f"Held-out labels: {samples} answers of {args.policy} to {args.num_problems} {args.split} problems, "
            f"{first['steps']} steps ({first['samples_with_error']} answers with an error).\n\n{table}")
    atomic_write_text(out / "results.md", text + "\n")
    print(text)


def main(argv: list[str] | None = None) -> int:
    """``halluc-rl prm [options]`` trains; ``halluc-rl prm eval [options]`` compares PRMs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["eval"]:
        def run_eval() -> int:
            evaluate(*parse_cli([PRMEvalArgs], argv[1:], prog="halluc-rl prm eval"))
            return 0

        return cli("halluc-rl prm eval", run_eval)

    def run() -> int:
        parsed = parse_cli([PRMScriptArgs, ModelArgs, LoraArgs, PRMConfig], argv, prog="halluc-rl prm")
        trainer = train(*parsed)
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        out = parsed[-1].output_dir
        loss = f"; final training loss {losses[-1]:.4f}" if losses else ""
        print(f"saved the PRM to {out}{loss}; load it with HFProcessReward.from_pretrained({out!r}, tokenizer, "
              "step_token_ids=halluc_rl.labels.step_token_ids(tokenizer))")
        return 0

    return cli("halluc-rl prm", run)


if __name__ == "__main__":
    raise SystemExit(main())
