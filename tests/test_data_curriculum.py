from collections import Counter

import pytest
from transformers import Trainer, TrainerControl, TrainerState, TrainingArguments

from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.collator import MaskedErrorCollator
from halluc_rl.data.curriculum import Curriculum, CurriculumCallback, CurriculumDataset
from halluc_rl.data.errors import PlausibleErrors, RandomTokenErrors
from tests.conftest import make_model

PROBLEMS = ArithmeticTask(seed=2).problems("train", 60)


pytestmark = pytest.mark.usefixtures("one_thread")


def _errors_per_example(dataset: CurriculumDataset) -> Counter:
    return Counter(sum(span["kind"] == "error" for span in dataset[i]["spans"]) for i in range(len(dataset)))


def test_caps_by_epoch_and_by_step():
    by_epoch = Curriculum()
    assert [by_epoch.cap_at(epoch=e) for e in range(5)] == [2, 5, 10, 10, 10]
    by_step = Curriculum(caps=(1, 3), boundaries=(100,), unit="step")
    assert [by_step.cap_at(step=s) for s in (0, 99, 100, 5000)] == [1, 1, 3, 3]
    assert by_step.cap_at(epoch=7, step=0) == 1  # the unit decides which counter matters
    for bad in [dict(caps=(2, 5), boundaries=(1, 2)), dict(boundaries=(2, 1)), dict(unit="token")]:
        with pytest.raises(ValueError):
            Curriculum(**bad)


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_callback_changes_the_error_distribution_at_each_boundary(tokenizer, unit):
    boundaries = (1, 2) if unit == "epoch" else (10, 20)
    source = PlausibleErrors(error_rate=1.0, seed=3)
    dataset = CurriculumDataset(PROBLEMS, tokenizer, source, Curriculum(boundaries=boundaries, unit=unit))
    callback = CurriculumCallback(dataset)
    args, control = TrainingArguments(output_dir="unused", report_to=[]), TrainerControl()
    phases = [(0.0, 0), (1.0, 10), (2.0, 20)]  # (state.epoch, state.global_step) right at each boundary
    counts, caps = [], []
    for epoch, step in phases:
        state = TrainerState(epoch=epoch, global_step=step)
        callback.on_epoch_begin(args, state, control) if unit == "epoch" else callback.on_step_end(args, state, control)
        counts.append(_errors_per_example(dataset))
        caps.append(dataset.cap)
    assert caps == [2, 5, 10]
    assert set(counts[0]) == {1, 2}
    assert max(counts[1]) > 2 and set(counts[1]) <= set(range(1, 6))
    assert max(counts[2]) > 5 and set(counts[2]) <= set(range(1, 11))
    means = [sum(k * v for k, v in c.items()) / sum(c.values()) for c in counts]
    assert means[0] < means[1] < means[2]
    # just before a boundary the cap is still the old one
    callback.on_step_end(args, TrainerState(epoch=0.9, global_step=9), control)
    assert dataset.cap == 2


def test_items_are_fresh_each_epoch_and_reproducible(tokenizer):
    def make():
        return CurriculumDataset(PROBLEMS[:10], tokenizer, RandomTokenErrors(error_rate=1.0), Curriculum(caps=(2,),
                                                                                                      boundaries=()))
    dataset = make()
    first = [dataset[i]["input_ids"] for i in range(10)]
    assert first == [make()[i]["input_ids"] for i in range(10)]
    dataset.set_progress(epoch=1)
    assert first != [dataset[i]["input_ids"] for i in range(10)]


def test_trainer_sees_more_errors_each_epoch(tokenizer, tmp_path):
    """End to end: a real Trainer with the callback gets batches whose error counts follow the caps."""
    dataset = CurriculumDataset(PROBLEMS[:8], tokenizer, RandomTokenErrors(error_rate=1.0, seed=1), Curriculum())
    collator = MaskedErrorCollator(pad_token_id=tokenizer.pad_token_id,
                                   backtrack_token_id=backtrack_token_id(tokenizer))
    seen: list[list[int]] = []

    def recording(features):
        seen.append([sum(span["kind"] == "error" for span in f["spans"]) for f in features])
        return collator(features)

    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=3, per_device_train_batch_size=4,
                             report_to=[], save_strategy="no", use_cpu=True, logging_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=make_model("llama", tokenizer), args=args, train_dataset=dataset,
                      data_collator=recording, callbacks=[CurriculumCallback(dataset)])
    trainer.train()
    per_epoch = [sum(seen[2 * e : 2 * e + 2], []) for e in range(3)]
    assert len(seen) == 6 and all(len(errors) == 8 for errors in per_epoch)
    assert max(per_epoch[0]) <= 2
    assert 2 < max(per_epoch[1]) <= 5
    assert 5 < max(per_epoch[2]) <= 10
