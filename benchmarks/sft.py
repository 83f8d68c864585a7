"""SFT throughput: masked-error SFT vs TRL ``SFTTrainer`` with its default collator.

Same model (the embedded tiny Llama, full fine-tuning), same examples (offline arithmetic problems with plausible
errors, built once), same batch size and number of steps. Tokens are counted the same way for both: the length of
each example's action stream (prompt, errors, backtracks, corrections). Ours trains with the rewind layout (4D mask,
no backtrack inputs, errors masked); TRL's trains the stream as plain causal text.

    python benchmarks/sft.py [--steps 40] [--batch 32] [--repeats 3]

The last line is one JSON object; ``sft_vs_trl`` = our tokens/s / TRL's tokens/s (target >= 0.95).
"""

from __future__ import annotations

import argparse
import importlib
import json
import tempfile
import time

import datasets
import torch
from trl import SFTConfig, SFTTrainer

from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.collator import MaskedErrorCollator
from halluc_rl.data.errors import PlausibleErrors, build_examples
from halluc_rl.modeling import load_model_and_tokenizer

sft = importlib.import_module("halluc_rl.agents.sft")


def run(trainer_cls, dataset, collator, tokenizer, steps: int, batch: int) -> float:
    """Seconds of ``trainer.train()`` for ``steps`` optimiser steps (a fresh model each time)."""
    model, _, _ = load_model_and_tokenizer("tiny")
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, learning_rate=1e-3,
                           report_to=[], save_strategy="no", use_cpu=True, activation_checkpointing=False,
                           logging_steps=steps, disable_tqdm=True, remove_unused_columns=False, seed=0, bf16=False,
                           dataset_kwargs={"skip_prepare_dataset": True}, dataloader_drop_last=True)
        kwargs = {"data_collator": collator} if collator is not None else {}
        trainer = trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer, **kwargs)
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    _, tokenizer, bt = load_model_and_tokenizer("tiny")
    problems = ArithmeticTask(seed=0).problems("train", args.steps * args.batch)
    examples = build_examples(problems, tokenizer, PlausibleErrors(error_rate=0.5, max_errors=3,
                                                                    error_length=(1, 2), seed=0))
    features = [e.to_features() for e in examples]
    ours_ds = datasets.Dataset.from_list(features)
    trl_ds = datasets.Dataset.from_list([{"input_ids": f["input_ids"]} for f in features])
    tokens = sum(len(f["input_ids"]) for f in features)
    ours_collator = MaskedErrorCollator(pad_token_id=tokenizer.pad_token_id, backtrack_token_id=bt)
    run(SFTTrainer, trl_ds, None, tokenizer, 3, args.batch)  # warm-up
    t_trl = t_ours = float("inf")
    for _ in range(args.repeats):  # round-robin, so drift in the machine's speed hits both alike
        t_trl = min(t_trl, run(SFTTrainer, trl_ds, None, tokenizer, args.steps, args.batch))
        t_ours = min(t_ours, run(sft.MaskedErrorSFTTrainer, ours_ds, ours_collator, tokenizer, args.steps, args.batch))
    results = {"steps": args.steps, "batch": args.batch, "tokens": tokens, "threads": torch.get_num_threads(),
               "trl_tok_s": tokens / t_trl, "ours_tok_s": tokens / t_ours, "sft_vs_trl": t_trl / t_ours}
    print(f"{args.steps} steps x batch {args.batch}, {tokens} stream tokens, tiny Llama, full fine-tuning")
    print(f"  TRL SFTTrainer, default collator  {tokens / t_trl:8.0f} tok/s")
    print(f"  masked-error SFT (rewind layout)   {tokens / t_ours:8.0f} tok/s  ({t_trl / t_ours:.2f}x)")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
