"""Train a tiny model from scratch (or on from ``--init``) on an offline generator task (``halluc-rl pretrain``).

A small Llama and its byte-level BPE tokenizer (built with ``tokenizers``, saved as ``PreTrainedTokenizerFast``),
reproducible from a seed. Training stops once greedy accuracy on validation problems reaches
``target_accuracy`` - the shipped model should solve part of the task and leave room for self-correction - or at
``max_steps``. On ``deps`` that accuracy is strict (every line right, :mod:`halluc_rl.data.deps_check`).

With ``--error_rate R`` a share R of the training solutions hold errors and their backtracks (retry data, Physics of
LMs 2.2: ``--error_kinds premature`` is its retry_weak), laid out as ``--semantics`` (:class:`MaskedErrorCollator`
layouts ``rewind`` or ``retry``), error tokens masked unless ``--train_errors``; the saved policy records its
backtrack id, head and semantics. ``--error_rate 0`` trains the control on the same problems, batches and steps.
Without errors the backtrack rows are set after training (what ``add_backtrack_token`` gives a new token), so the
saved model is ready for masked-error SFT.

    halluc-rl pretrain --output_dir halluc_rl/assets/tiny        # rebuild the shipped model
    halluc-rl pretrain --task deps --error_rate 0.3 --error_kinds premature --init tiny-deps
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

from halluc_rl.backtrack import SEMANTICS, backtrack_token_id
from halluc_rl.checkpoints import check_finite_weights, publish, staging_dir
from halluc_rl.config import (
    NonFiniteError,
    UsageError,
    check_choice,
    check_output_dir,
    check_positive,
    check_task,
    cli,
    parse_cli,
    save_config,
)
from halluc_rl.data.arithmetic import ArithmeticTask
from halluc_rl.data.collator import MaskedErrorCollator
from halluc_rl.data.deps import DepsTask
from halluc_rl.data.deps_check import check_solution
from halluc_rl.data.deps_errors import check_error_kinds, plausible_errors
from halluc_rl.data.problems import encode_problem, format_prompt, format_solution
from halluc_rl.data.tasks import GENERATOR_TASKS, parse_task
from halluc_rl.generation import generate
from halluc_rl.modeling import init_backtrack_rows, load_model_and_tokenizer
from halluc_rl.policy import set_policy_backtrack
from halluc_rl.registry import is_known_name
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
    vocab_size: int = field(default=512, metadata={"help": "BPE vocabulary size."})
    split_digits: bool = field(default=True, metadata={
        "help": "Every digit its own token; false keeps a digit with its space (' 7': one token), for one-digit "
                "values (deps; measured slower to learn there, docs/tasks.md)."})
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
    task: str = field(default="arithmetic", metadata={
        "help": "A generator task: arithmetic (min_steps, max_steps, max_value above; settings in the name win) or "
                "deps[:vars=N,steps=N,...]."})
    error_rate: float = field(default=0.0, metadata={"help": "Share of training solutions given errors (0: clean)."})
    error_kinds: list[str] = field(default_factory=list, metadata={
        "help": "Error kinds (empty: all of the task's): deps premature, unneeded, slip; arithmetic digit, operator, "
                "step, check."})
    max_errors: int = field(default=1, metadata={"help": "Most errors in one solution."})
    train_errors: bool = field(default=False, metadata={"help": "retry semantics: also train the error tokens."})
    semantics: str = field(default="rewind", metadata={"help": "rewind or retry: the layout errors are trained in."})
    init: str | None = field(default=None, metadata={
        "help": "Continue full training from this saved model (and its tokenizer), or an embedded one (tiny-deps), "
                "instead of from scratch."})
    eval_max_new_tokens: int = field(default=0, metadata={
        "help": "Tokens per validation answer (0: 64 on arithmetic, else the longest reference plus 16)."})


def greedy_accuracy(model, tokenizer, problems, batch_size: int = 100, max_new_tokens: int = 64,
                    strict: bool = False, **sampling) -> float | tuple[float, float]:
    """Share of ``problems`` solved (answer graded by the rule grader), backtracking disabled; with ``strict``,
    ``(answer accuracy, strict accuracy)``, strict meaning the deps checker accepts the whole answer."""
    prompts = [format_prompt(p.question, tokenizer) for p in problems]
    correct = right = 0.0
    for i in range(0, len(problems), batch_size):
        out = generate(model, tokenizer, prompts[i : i + batch_size], max_new_tokens=max_new_tokens,
                       backtrack_bias=float("-inf"), **sampling)
        correct += sum(RuleGrader().score(out.texts, problems[i : i + batch_size]))
        if strict:
            right += sum(check_solution(p.question, text, ended=bool(done)).on_track
                         for p, text, done in zip(problems[i : i + batch_size], out.texts, out.finished.tolist()))
    return (correct / len(problems), right / len(problems)) if strict else correct / len(problems)


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


def validate(args: PretrainArgs) -> str:
    """Every check that needs no model (one-line UsageErrors), before anything is written; returns the task name."""
    check_positive(args, "num_train_problems", "vocab_size", "hidden_size", "num_layers", "heads", "batch_size",
                   "learning_rate", "max_train_steps", "eval_every", "eval_problems", "max_errors")
    check_positive(args, "warmup_steps", "eval_max_new_tokens", allow_zero=("warmup_steps", "eval_max_new_tokens"))
    name = check_task(args.task)
    if name not in GENERATOR_TASKS:
        raise UsageError(f"task: pretraining draws problems from a generator task ({', '.join(GENERATOR_TASKS)}), "
                         f"not {name}")
    if not 0.0 <= args.error_rate <= 1.0:
        raise UsageError(f"error_rate: must be in [0, 1], got {args.error_rate}")
    check_choice("semantics", args.semantics, SEMANTICS)
    if args.train_errors and args.semantics != "retry":
        raise UsageError("train_errors: the rewind semantics never trains an error's tokens; use --semantics retry")
    try:
        check_error_kinds(name, args.error_kinds)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.init is not None and not (is_known_name(args.init) or Path(args.init).is_dir()):
        raise UsageError(f"init: no saved model in {args.init} (give the output_dir of an earlier pretrain, or "
                         "tiny-deps)")
    check_output_dir(args.output_dir)
    return name


def make_task(args: PretrainArgs, name: str):
    """The generator the problems come from (arithmetic's own fields, overridden by settings in the task name)."""
    knobs = parse_task(args.task)[1]
    if name == "arithmetic":
        base = dict(min_steps=args.min_steps, max_steps=args.max_steps, max_value=args.max_value)
        return ArithmeticTask(**{**base, **knobs}, seed=args.seed)
    return DepsTask(**knobs, seed=args.seed)


def make_source(args: PretrainArgs, name: str):
    """The error source of the training solutions, or None without errors."""
    if args.error_rate == 0:
        return None
    return plausible_errors(name, args.error_kinds, error_rate=args.error_rate, max_errors=args.max_errors,
                            seed=args.seed)


def build_model(args: PretrainArgs, train):
    """(model, tokenizer): a new tokenizer and model from ``args``, or the saved ones of ``args.init``."""
    if args.init is not None:
        model, tokenizer, _ = load_model_and_tokenizer(args.init)
        model.train()
        return model, tokenizer
    corpus = [format_prompt(p.question, None) + format_solution(p.solution, None) for p in train[:5000]]
    tokenizer = train_tokenizer(corpus, vocab_size=args.vocab_size, split_digits=args.split_digits)  # + BACKTRACK
    model = build_tiny_model("llama", vocab_size=len(tokenizer), seed=args.seed, hidden_size=args.hidden_size,
                             num_layers=args.num_layers, heads=args.heads)
    model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer


def make_batcher(args: PretrainArgs, tokenizer, source):
    """``batch(step, rows)``: the training tensors of problem ``rows`` (pairs of ids) at ``step``: the plain
    collate without errors, else the examples of ``source`` (keyed by step and slot) in the ``semantics`` layout."""
    if source is None:
        return lambda step, rows: collate(rows, tokenizer.pad_token_id)
    collator = MaskedErrorCollator(pad_token_id=tokenizer.pad_token_id, backtrack_token_id=backtrack_token_id(tokenizer),
                                   train_errors=args.train_errors, layout=args.semantics)

    def batch(step: int, rows) -> dict[str, torch.Tensor]:
        examples = source.make_examples(rows, tokenizer, keys=[f"{step}:{slot}" for slot in range(len(rows))])
        return collator([example.to_features() for example in examples])

    return batch


def pretrain(args: PretrainArgs) -> int:
    name = validate(args)
    out_dir = Path(args.output_dir)
    save_config(out_dir / "config.yaml", args)  # the files a trainer writes: finished_run reads them
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    task = make_task(args, name)
    train = task.problems("train", args.num_train_problems)
    val = task.problems("validation", args.eval_problems)
    model, tokenizer = build_model(args, train)
    bt = backtrack_token_id(tokenizer)
    source = make_source(args, name)
    # untrained until init_backtrack_rows below, unless errors train them; the semantics is recorded once it means
    # something (errors trained in it, or asked for), so the clean default build writes the config it always did
    trained_in = args.semantics if source is not None or args.semantics != "rewind" else None
    set_policy_backtrack(model, bt, semantics=trained_in)
    encoded = [encode_problem(p, tokenizer) for p in train]
    longest = max(len(encode_problem(p, tokenizer)[1]) for p in val)
    max_new = args.eval_max_new_tokens or (64 if name == "arithmetic" else longest + 16)
    params = sum(p.numel() for p in model.parameters())
    print(f"tiny Llama: {params / 1e6:.2f}M parameters, vocab {len(tokenizer)}, {len(train)} training problems")
    history = train_loop(args, model, tokenizer, encoded, val, make_batcher(args, tokenizer, source),
                         max_new, strict=name == "deps")
    model.eval()
    if source is None:
        init_backtrack_rows(model, tokenizer, bt)  # what add_backtrack_token gives a new token
    check_finite_weights(model, "the pretrained model")
    staging = staging_dir(out_dir)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "log_history.json").write_text(json.dumps(history, indent=1))
    publish(staging, out_dir)
    print(f"saved to {out_dir} after {history[-1]['step']} steps, {history[-1]['minutes']:.1f} min, "
          f"validation greedy accuracy {history[-1]['val_accuracy_greedy']:.3f}")
    return 0


def train_loop(args: PretrainArgs, model, tokenizer, encoded, val, batch, max_new_tokens: int,
               strict: bool = False) -> list[dict]:
    """AdamW with warm-up then cosine decay, evaluated every ``eval_every`` steps; stops at ``target_accuracy``
    (strict accuracy with ``strict``). Returns the evaluation history."""
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, args.warmup_steps)) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / args.max_train_steps))))
    gen = random.Random(args.seed)
    history: list[dict] = []
    start = time.time()
    model.train()
    bar = tqdm(range(1, args.max_train_steps + 1), desc="pretrain", dynamic_ncols=True)
    accuracy = 0.0
    for step in bar:
        loss = model(**batch(step, [encoded[gen.randrange(len(encoded))] for _ in range(args.batch_size)])).loss
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
            scores = greedy_accuracy(model, tokenizer, val, max_new_tokens=max_new_tokens, strict=strict)
            model.train()
            history.append({"step": step, "loss": loss.item(),
                            "val_accuracy_greedy": scores[0] if strict else scores,
                            "minutes": (time.time() - start) / 60})
            if strict:
                history[-1]["val_strict_greedy"] = scores[1]
            accuracy = scores[1] if strict else scores
            tqdm.write(json.dumps(history[-1]))
            if accuracy >= args.target_accuracy:
                break
    return history


if __name__ == "__main__":
    raise SystemExit(main())
