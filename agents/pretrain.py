"""Train the embedded tiny model from scratch on the offline arithmetic task (``halluc-rl pretrain``).

A small Llama and its byte-level BPE tokenizer (built with ``tokenizers``, saved as ``PreTrainedTokenizerFast``),
reproducible from a seed. Training stops once greedy accuracy on validation problems reaches
``target_accuracy`` - the shipped model should solve part of the task and leave room for self-correction - or at
``max_steps``. The backtrack token is added last (its rows initialised by ``add_backtrack_token``) so the saved
model is ready for masked-error SFT.

    halluc-rl pretrain --output_dir halluc_rl/assets/tiny        # rebuild the shipped model
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from halluc_rl.backtrack import backtrack_token_id
from halluc_rl.checkpoints import check_finite_weights, publish, staging_dir
from halluc_rl.config import NonFiniteError, check_output_dir, check_positive, cli, parse_cli, save_config
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.problems import encode_problem, format_prompt, format_solution
from halluc_rl.generation import generate
from halluc_rl.modeling import init_backtrack_rows
from halluc_rl.policy import set_policy_backtrack
from halluc_rl.rewards import RuleGrader
from halluc_rl.tiny import build_tiny_model, train_tokenizer


@dataclass
class PretrainArgs:
    output_dir: str = field(default="runs/pretrain", metadata={"help": "Where the model and tokenizer are saved."})
    seed: int = field(default=0, metadata={"help": "Seeds the task, the tokenizer corpus, init and batches."})
    num_train_problems: int = field(default=20000, metadata={"help": "Training problems (drawn once)."})
    min_steps: int = field(default=2, metadata={"help": "Task: fewest operations per problem."})
    max_steps: int = field(default=3, metadata={"help": "Task: most operations per problem."})
    max_value: int = field(default=20, metadata={"help": "Task: largest starting or added amount."})
    vocab_size: int = field(default=512, metadata={"help": "BPE vocabulary size (digits stay single tokens)."})
    hidden_size: int = field(default=128, metadata={"help": "Model width."})
    num_layers: int = field(default=4, metadata={"help": "Transformer layers."})
    heads: int = field(default=4, metadata={"help": "Attention heads."})
    batch_size: int = field(default=32, metadata={"help": "Sequences per optimiser step."})
    learning_rate: float = field(default=3e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up, then cosine decay."})
    max_train_steps: int = field(default=1500, metadata={"help": "Stop after this many optimiser steps."})
    eval_every: int = field(default=150, metadata={"help": "Evaluate on validation problems every N steps."})
    eval_problems: int = field(default=100, metadata={"help": "Validation problems per evaluation."})
    target_accuracy: float = field(default=0.5, metadata={"help": "Stop once greedy validation accuracy >= this."})


def greedy_accuracy(model, tokenizer, problems, batch_size: int = 100, **sampling) -> float:
    """Share of ``problems`` solved (answer graded by the rule grader), backtracking disabled."""
    prompts = [format_prompt(p.question, tokenizer) for p in problems]
    correct = 0.0
    for i in range(0, len(problems), batch_size):
        out = generate(model, tokenizer, prompts[i : i + batch_size], max_new_tokens=64,
                       backtrack_bias=float("-inf"), **sampling)
        correct += sum(RuleGrader().score(out.texts, problems[i : i + batch_size]))
    return correct / len(problems)


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids with labels on the response only."""
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), width), -100, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for b, (p, r) in enumerate(rows):
        ids[b, : len(p) + len(r)] = torch.tensor(p + r)
        labels[b, len(p) : len(p) + len(r)] = torch.tensor(r)
        mask[b, : len(p) + len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def main(argv: list[str] | None = None) -> int:
    return cli("halluc-rl pretrain", lambda: pretrain(parse_cli([PretrainArgs], argv, prog="halluc-rl pretrain")[0]))


def validate(args: PretrainArgs) -> None:
    """Every check that needs no model (one-line UsageErrors), before anything is written."""
    check_positive(args, "num_train_problems", "vocab_size", "hidden_size", "num_layers", "heads", "batch_size",
                   "learning_rate", "max_train_steps", "eval_every", "eval_problems")
    check_positive(args, "warmup_steps", allow_zero=("warmup_steps",))
    check_output_dir(args.output_dir)


def pretrain(args: PretrainArgs) -> int:
    validate(args)
    out_dir = Path(args.output_dir)
    save_config(out_dir / "pretrain_config.yaml", args)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    task = ArithmeticTask(min_steps=args.min_steps, max_steps=args.max_steps, max_value=args.max_value,
                          seed=args.seed)
    train = task.problems("train", args.num_train_problems)
    val = task.problems("validation", args.eval_problems)

    corpus = [format_prompt(p.question, None) + format_solution(p.solution, None) for p in train[:5000]]
    tokenizer = train_tokenizer(corpus, vocab_size=args.vocab_size)  # <|BACKTRACK|> included, never in the data
    model = build_tiny_model("llama", vocab_size=len(tokenizer), seed=args.seed, hidden_size=args.hidden_size,
                             num_layers=args.num_layers, heads=args.heads)
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    set_policy_backtrack(model, backtrack_token_id(tokenizer))  # untrained until init_backtrack_rows below
    encoded = [encode_problem(p, tokenizer) for p in train]
    params = sum(p.numel() for p in model.parameters())
    print(f"tiny Llama: {params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, {len(train)} training problems")

    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup_steps) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.max_train_steps))))
    gen = random.Random(args.seed)
    history: list[dict] = []
    start = time.time()
    model.train()
    bar = tqdm(range(1, args.max_train_steps + 1), desc="pretrain", dynamic_ncols=True)
    accuracy = 0.0
    for step in bar:
        batch = collate([encoded[gen.randrange(len(encoded))] for _ in range(args.batch_size)],
                        tokenizer.pad_token_id)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise NonFiniteError(f"step {step}: the loss is {loss.item()}; nothing was saved (lower the learning "
                                 f"rate, now {args.learning_rate})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.2f}")
        if step % args.eval_every == 0 or step == args.max_train_steps:
            accuracy = greedy_accuracy(model, tokenizer, val)
            model.train()
            history.append({"step": step, "loss": loss.item(), "val_accuracy_greedy": accuracy,
                            "minutes": (time.time() - start) / 60})
            tqdm.write(json.dumps(history[-1]))
            if accuracy >= args.target_accuracy:
                break
    model.eval()
    init_backtrack_rows(model, tokenizer, backtrack_token_id(tokenizer))  # what add_backtrack_token gives a new token
    check_finite_weights(model, "the pretrained model")
    staging = staging_dir(out_dir)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "pretrain_history.json").write_text(json.dumps(history, indent=1))
    publish(staging, out_dir)
    print(f"saved to {out_dir} after {history[-1]['step']} steps, {history[-1]['minutes']:.1f} min, "
          f"validation greedy accuracy {history[-1]['val_accuracy_greedy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
