"""A curriculum on the number of errors per example: few at first, more as training goes on.

:class:`Curriculum` maps an epoch (or an optimizer step) to a cap on errors per example; :class:`CurriculumDataset`
builds each example on the fly from its problem and an error source under the current cap, so the examples a
trainer sees really change; :class:`CurriculumCallback` moves the dataset to the cap of the current epoch or step.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset
from transformers import TrainerCallback

from halluc_rl.data.errors import ErrorSource
from halluc_rl.data.problems import Problem, encode_problem


@dataclass(frozen=True)
class Curriculum:
    """Caps on errors per example: ``caps[0]`` until ``boundaries[0]``, then ``caps[1]``, and so on.

    ``unit`` is ``"epoch"`` (boundaries are epoch indices: the default raises the cap at the start of epochs 1 and
    2) or ``"step"`` (boundaries are optimizer steps, ``global_step``).
    """

    caps: tuple[int, ...] = (2, 5, 10)
    boundaries: tuple[int, ...] = (1, 2)
    unit: str = "epoch"

    def __post_init__(self) -> None:
        if self.unit not in ("epoch", "step"):
            raise ValueError(f"unit must be 'epoch' or 'step', got {self.unit!r}")
        if len(self.boundaries) != len(self.caps) - 1:
            raise ValueError(f"{len(self.caps)} caps need {len(self.caps) - 1} boundaries, got {self.boundaries}")
        if list(self.boundaries) != sorted(set(self.boundaries)) or min(self.caps) < 0:
            raise ValueError("boundaries must increase strictly and caps must be >= 0")

    def cap_at(self, epoch: int = 0, step: int = 0) -> int:
        """The cap in force at ``epoch`` (whole epochs done) or ``step`` (optimizer steps done), by ``unit``."""
        now = epoch if self.unit == "epoch" else step
        return self.caps[bisect.bisect_right(self.boundaries, now)]


class CurriculumDataset(Dataset):
    """Backtrack examples built on the fly: item ``i`` is problem ``i`` with errors under the current cap.

    Items are :meth:`BacktrackExample.to_features` dicts for :class:`MaskedErrorCollator`. Item ``i`` of epoch ``e``
    uses key ``"{e}:{i}"`` of the source, so each epoch draws fresh errors and a rerun gives the same ones. The cap
    lives in this object: load in the main process (``dataloader_num_workers=0``) or workers keep a stale copy.
    """

    def __init__(
        self, problems: Sequence[Problem], tokenizer, source: ErrorSource, curriculum: Curriculum | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.source = source
        self.curriculum = curriculum or Curriculum()
        self.pairs = [encode_problem(problem, tokenizer) for problem in problems]  # encoded once
        self.epoch = 0
        self.step = 0
        self.cap = self.curriculum.cap_at(0, 0)

    def set_progress(self, epoch: int = 0, step: int = 0) -> int:
        """Move to ``epoch``/``step``; returns the cap now in force."""
        self.epoch, self.step = int(epoch), int(step)
        self.cap = self.curriculum.cap_at(self.epoch, self.step)
        return self.cap

    def __len__(self) -> int:
        return len(self.pairs)

    def example(self, index: int):
        """The :class:`~halluc_rl.data.errors.BacktrackExample` of item ``index`` under the current cap."""
        prompt, response = self.pairs[index]
        return self.source.make_example(prompt, response, self.tokenizer, key=f"{self.epoch}:{index}",
                                        max_errors=self.cap)

    def __getitem__(self, index: int) -> dict:
        return self.example(index).to_features()

    def features(self, indices: Sequence[int]) -> list[dict]:
        """Items ``indices`` built in one call, so a source that samples from a model (self-generated errors)
        decodes them as one batch rather than one by one."""
        pairs = [self.pairs[i] for i in indices]
        keys = [f"{self.epoch}:{i}" for i in indices]
        examples = self.source.make_examples(pairs, self.tokenizer, keys=keys, max_errors=self.cap)
        return [example.to_features() for example in examples]


class CurriculumCallback(TrainerCallback):
    """Keeps a :class:`CurriculumDataset` at the cap of the trainer's current epoch and step.

    Updated at train begin, at each epoch begin, and after each optimizer step. Epoch boundaries take effect for the
    whole new epoch; a step boundary takes effect from the next batch the trainer fetches (accelerate may have
    fetched one batch ahead, which then keeps the old cap).
    """

    def __init__(self, dataset: CurriculumDataset) -> None:
        self.dataset = dataset

    def _update(self, state) -> None:
        epoch = math.floor((state.epoch or 0.0) + 1e-6)  # whole epochs done; a float epoch may read 0.9999999
        self.dataset.set_progress(epoch=epoch, step=state.global_step)

    def on_train_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._update(state)

    def on_step_end(self, args, state, control, **kwargs):
        self._update(state)
