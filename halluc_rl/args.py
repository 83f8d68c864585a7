"""The argument blocks every command is built from, each field declared once: the model, the run folder, the task,
sampling, rewards and LoRA (and the TRL configs' precision default). Parsing and validating them is
:mod:`halluc_rl.config`; a command's own dataclass inherits the blocks it needs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass
class ModelArgs:
    """Which model (and its tokenizer, saved beside it) to load, and how.

    ``trust_remote_code`` is TRL's own config field (``SFTConfig.trust_remote_code``, off by default), so it is
    not repeated here.
    """

    model_name_or_path: str = field(
        default="tiny",
        metadata={"help": "Hub id, local path (a folder, or a .gguf file), 'tiny' (the embedded model), or a model "
                          "fetched with `halluc-rl models get NAME` (e.g. smollm2-135m; see `halluc-rl models list`)."},
    )
    dtype: str = field(default="float32", metadata={"help": "float32, bfloat16, float16 or auto."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})
    gguf_file: str | None = field(
        default=None,
        metadata={"help": "A llama.cpp GGUF file to load, inside model_name_or_path's folder (or Hub repo); it is "
                          "dequantised to dtype. Needs `pip install 'halluc-rl[gguf]'`. Convert it once with "
                          "`halluc-rl models convert` to skip the conversion on every load."},
    )


@dataclass
class RunArgs:
    """How a training run treats its output folder (shared by every trainer)."""

    resume: bool = field(default=True, metadata={
        "help": "Resume from the newest complete checkpoint in output_dir when there is one (false: start afresh)."})
    allow_config_change: bool = field(default=False, metadata={
        "help": "Let a resumed run continue under a config that differs from the one saved in output_dir."})


@dataclass
class TaskArgs:
    """Which problems a command works on: one block every command shares (each field declared here only)."""

    task: str = field(default="arithmetic", metadata={
        "help": "arithmetic (offline; settings by name, e.g. arithmetic:max_value=50,check=2) or gsm8k."})
    data_files: str | None = field(default=None, metadata={
        "help": "gsm8k: a local jsonl/parquet file or folder (None: the Hub)."})
    task_seed: int = field(default=0, metadata={"help": "Seed of the offline task's problems."})
    validation_size: int = field(default=500, metadata={
        "help": "gsm8k: train problems held out as validation (capped for small files)."})


@dataclass
class SamplingArgs:
    """How a command samples the policy: one name for the temperature everywhere (PPO's rollouts, DPO's pairs,
    PRM labels, self-generated errors, evaluation)."""

    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (softmax of logits / T)."})


@dataclass
class SemanticsArgs:
    """What a backspace leaves in the model's context (:data:`halluc_rl.backtrack.SEMANTICS`). A policy records
    the semantics it was trained in on ``model.config``; every command runs it in that one unless told otherwise."""

    semantics: str | None = field(default=None, metadata={
        "help": "rewind (a backspace forgets what it deleted) or retry (deleted tokens and backtracks stay in the "
                "context). Default: the policy's recorded semantics, else rewind."})
    override_semantics: bool = field(default=False, metadata={
        "help": "Run a policy in a semantics other than the one it was trained in (reported in the results)."})


PROCESS_REWARDS: tuple[str, ...] = ("none", "oracle", "prm", "implicit")


@dataclass
class RewardArgs:
    """The rewards of an RL command (PPO, GRPO): the outcome grader is always on; one process reward and the
    backtrack cost are chosen here. :func:`halluc_rl.mixers.build_rewards` assembles them."""

    process_reward: str = field(default="none", metadata={
        "help": "none, oracle (the offline task's reference), prm (a trained PRM directory, `halluc-rl prm`) or "
                "implicit (PRIME: the log-ratio of a saved PEFT policy, e.g. a DPO run, to its base)."})
    prm_path: str | None = field(default=None, metadata={"help": "prm / implicit: the PRM or the policy to load."})
    implicit_beta: float = field(default=0.1, metadata={"help": "implicit: the beta of its log-ratio reward."})
    process_weight: float = field(default=0.5, metadata={"help": "Weight of the process reward."})
    process_form: str = field(default="delta", metadata={
        "help": "delta (potential-based: Phi(s') - Phi(s)) or min (PURE min-form credit)."})
    backtrack_cost: float = field(default=0.0, metadata={"help": "Reward charged for every backtrack."})


RENAMED: dict[str, str] = {
    "sample_temperature": "temperature",
    "label_temperature": "temperature",
    "self_error_temperature": "temperature",
    "label_max_new_tokens": "max_new_tokens",
    "layout": "semantics",
}
"""Options that were renamed (the sampling settings got one name everywhere; SFT's ``layout`` is the semantics):
the old names are still read (command line and YAML) as the new ones."""


@dataclass
class LoraArgs:
    """PEFT LoRA settings (``use_lora: false`` trains every weight)."""

    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (true) or fine-tune every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Module names that get LoRA adapters."},
    )


class PrecisionDefaults:
    """Mixed into TRL configs: ``bf16`` left unset means on where a CUDA GPU supports it and off elsewhere.

    TRL turns bf16 on by default, which on a CPU autocasts every step to bf16: slower there, inexact against the
    fp32 rollouts the RL trainers compare with, and an error ("doesn't support bf16/gpu") on a CPU machine unless
    ``use_cpu`` is set. An explicit ``bf16: true`` is kept.

    TRL's default ``gradient_checkpointing`` (a name transformers deprecates) is carried over to
    ``activation_checkpointing`` when that is unset, so a config left at its defaults raises no deprecation
    warning; an explicit ``gradient_checkpointing`` other than the default still gets transformers' warning.
    """

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16:
            import torch

            self.bf16 = bool(not self.use_cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        default = next(f.default for f in fields(self) if f.name == "gradient_checkpointing")
        if self.activation_checkpointing is None and self.gradient_checkpointing == default:
            self.activation_checkpointing = self.gradient_checkpointing  # the same value, under the current name
        super().__post_init__()
