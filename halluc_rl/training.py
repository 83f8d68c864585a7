"""The flow every Trainer-based command shares: a ``transformers.Trainer`` (TRL's included) that stops on
non-finite losses and dead gradients, saves atomically with the policy's backtrack settings, and
:func:`run_training`: check the run folder, build, train and save."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from halluc_rl.adapters import check_same_base
from halluc_rl.atomic import atomic_write_json
from halluc_rl.checkpoints import (
    check_finite_weights,
    is_finite,
    lock_run_dir,
    prepare_run_dir,
    publish,
    staging_dir,
)
from halluc_rl.config import NonFiniteError, UsageError
from halluc_rl.policy import write_policy_config


class DeadGradientStop:
    """The one rule for a run whose gradients died (every trainer uses it: the Trainer mixin, PPO, GRPO).

    A step is *dead* when its gradient norm is exactly 0 while the loss is positive (a learning rate far too high
    saturated the network: the loss flattens and nothing trains) or the policy has collapsed (entropy 0: every
    action is certain, so no advantage can move it). After ``limit`` dead steps in a row :meth:`observe` raises
    :class:`NonFiniteError`. A zero gradient alone is legitimate (a group whose answers all got the same reward has
    zero advantages and a loss of exactly 0) and never stops a run.
    """

    entropy_floor = 1e-6
    """A mean entropy at or below this counts as a collapsed policy (float rounding keeps it off exact zero)."""

    def __init__(self, limit: int = 2, unit: str = "step"):
        self.limit, self.unit, self.count = limit, unit, 0

    def observe(self, step: int, grad_norm: float | None, loss: float | None, entropy: float | None = None, *,
                advice: str = "") -> None:
        """Record step ``step``; raise :class:`NonFiniteError` naming it once ``limit`` dead steps ran in a row."""
        collapsed = entropy is not None and entropy <= self.entropy_floor
        positive = loss is not None and loss > 0
        dead = grad_norm is not None and float(grad_norm) == 0.0 and (collapsed or positive)
        self.count = self.count + 1 if dead else 0
        if self.count >= self.limit:
            why = f"the loss is {loss:.4g}" if positive else "the policy has collapsed (entropy 0)"
            raise NonFiniteError(f"{self.unit} {step}: the gradient norm has been 0 for {self.count} {self.unit}s "
                                 f"while {why}: the run diverged and no longer learns; {advice}")


RATE_KEYS: tuple[str, ...] = ("rollout/backtrack_rate", "rollout/truncated_rate")
"""The rates a reward-hacking policy drives up: backtracking everywhere, and answers cut off at the action cap."""


def rate_jumps(history: list[dict], keys: Sequence[str] = RATE_KEYS, floor: float = 0.5,
               factor: float = 3.0) -> list[str]:
    """One warning line per rate of the last row that jumped: above ``floor`` and at least ``factor`` times its
    mean over the earlier rows (none on the first row: there is nothing to compare with). A policy paid per
    backtrack drives every answer to the action cap within a few updates; the run goes on, but the user is told."""
    if len(history) < 2:
        return []
    last, warnings = history[-1], []
    for key in keys:
        earlier = [r[key] for r in history[:-1] if r.get(key) is not None]
        value = last.get(key)
        if value is None or not earlier:
            continue
        mean = sum(earlier) / len(earlier)
        if value > floor and value >= factor * mean:
            warnings.append(f"warning: update {last['update']}: {key} jumped to {value:.3f} (mean so far "
                            f"{mean:.3f}); the policy may be hacking its reward (check backtrack_cost and the "
                            "process reward, or lower the learning rate)")
    return warnings


class SafeTrainerMixin:
    """For ``transformers.Trainer`` subclasses (TRL's included): stop on non-finite losses and gradient norms before
    the optimiser applies them, never save non-finite weights, save checkpoints atomically, and save the policy's
    model config (its backtrack settings) with every copy."""

    dead_steps_limit = 2
    """Consecutive dead steps (:class:`DeadGradientStop`) after which the run counts as diverged."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not is_finite(loss):
            raise NonFiniteError(f"step {self.state.global_step + 1}: the loss is {float(loss)}; nothing was saved "
                                 f"for this step (lower the learning rate, now {self.args.learning_rate})")
        self._last_loss = float(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        step = self.state.global_step + 1
        if not is_finite(norm):
            raise NonFiniteError(f"step {step}: the gradient norm is {float(norm)}; nothing was saved for this step "
                                 f"(lower the learning rate, now {self.args.learning_rate})")
        if getattr(self, "_dead_stop", None) is None:
            self._dead_stop = DeadGradientStop(self.dead_steps_limit)
        self._dead_stop.observe(step, None if norm is None else float(norm), getattr(self, "_last_loss", None),
                                getattr(self, "_last_entropy", None), advice="nothing was saved for these steps "
                                f"(lower the learning rate, now {self.args.learning_rate})")
        return norm

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        check_finite_weights(self.model, f"step {self.state.global_step}")
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        if hasattr(model, "peft_config") and self.args.should_save:
            # The adapter alone: the backtrack rows travel as trainable tokens, and the base's embeddings are never
            # saved (PEFT's "auto" would look the base up by name, on the Hub for a name like "tiny").
            os.makedirs(output_dir, exist_ok=True)
            model.save_pretrained(output_dir, state_dict=state_dict, save_embedding_layers=False,
                                  selected_adapters=[model.active_adapter])  # not TRL's frozen "ref" copy
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
        elif not hasattr(model, "peft_config"):
            super()._save(output_dir, state_dict)
        if self.args.should_save:
            write_policy_config(self.model, output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """Write ``checkpoint-N`` into a hidden staging folder, then rename it into place (atomic)."""
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(self._get_output_dir(trial=trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f".staging-{name}"
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: str(staging)  # Trainer writes run_dir/checkpoint-N: redirect it
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = run_dir / name
            if final.exists():  # a resumed run saving the same step again
                shutil.rmtree(final)
            os.replace(staging / name, final)
            shutil.rmtree(staging)
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, use_mtime=False)
        self.accelerator.wait_for_everyone()


def save_policy(trainer, output_dir: str | Path) -> None:
    """Save the trained policy into ``output_dir`` through a staging folder (:func:`publish`), so every file there
    is complete whatever happens, and nothing non-finite is saved."""
    staging = staging_dir(output_dir) if trainer.args.should_save else Path(output_dir) / ".staging-final"
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        publish(staging, output_dir)
    trainer.accelerator.wait_for_everyone()


def train_and_save(trainer, output_dir: str | Path, resume: str | None) -> None:
    """``trainer.train()`` (from ``resume``), then the policy and ``log_history.json``, atomically."""
    trainer.train(resume_from_checkpoint=resume)
    save_policy(trainer, output_dir)
    if trainer.is_world_process_zero():
        atomic_write_json(Path(output_dir) / "log_history.json", trainer.state.log_history)


def run_training(configs: Sequence, validate: Callable[..., None], build: Callable[[str | None], Any]):
    """The flow every Trainer-based command shares. ``configs`` is the command's parsed dataclasses, its script
    arguments first, :class:`~halluc_rl.config.ModelArgs` second and the trainer's config last.

    1. ``validate(*configs)``, once: one-line usage errors, before anything is loaded or written;
    2. lock the run folder for the whole run (:func:`~halluc_rl.checkpoints.lock_run_dir`; a second command into
       it is refused), check it against the configs and write ``config.yaml`` (only then), and refuse a checkpoint
       of another base;
    3. ``build(resume)`` the trainer (a model that does not load, or too little data, is a usage error);
    4. train, and save the policy and its history atomically.
    """
    script, model_args, config = configs[0], configs[1], configs[-1]
    validate(*configs)
    with lock_run_dir(config.output_dir, enabled=int(os.environ.get("RANK", "0")) == 0):  # one run per folder
        resume = prepare_run_dir(config.output_dir, configs,
                                 resume=script.resume and not config.resume_from_checkpoint,
                                 allow_change=script.allow_config_change) or config.resume_from_checkpoint
        if resume:
            check_same_base(resume, model_args.model_name_or_path)
        try:
            trainer = build(resume)
        except (OSError, ValueError) as err:
            if isinstance(err, (UsageError, NonFiniteError)):
                raise
            raise UsageError(" ".join(str(err).split())) from err
        train_and_save(trainer, config.output_dir, resume)
    return trainer
