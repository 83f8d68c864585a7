"""Scoring speed: the action-stream scorer vs a plain causal forward+backward over the same number of actions.

Tiny Llama (about 2.6M parameters, as in benchmarks/generation.py), batch 32, 128 actions per row of which 25% are
backtracks (rows differing), prompts of 12-32 tokens:

    python benchmarks/scoring.py [--repeats 5] [--model tiny-random|NAME] [--batch 32] [--steps 128]

* ours: :func:`halluc_rl.scoring.score_actions` (replay, one packed forward with the 4D rewind mask, the decoding
  rules) on the backtracking streams, then ``logprobs.sum().backward()``;
* baseline: a plain causal forward+backward over the same tokens our packing feeds: each row's prompt and its
  typed (non-backtrack) actions as one causal sequence, log-softmax, the log-probs of the typed tokens, backward.
  Both sides process the same number of input tokens; ours also applies the rewind mask, replays the decoder and
  scores the backtrack actions.

``scoring_vs_forward`` = baseline seconds / our seconds for the same input tokens (tokens/s ratio; target >= 0.8).
Timed round-robin, best of ``--repeats``. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generation import best_times  # noqa: E402

from halluc_rl.modeling import load_model_and_tokenizer
from halluc_rl.policy import set_policy_backtrack
from halluc_rl.scoring import score_actions  # noqa: E402
from halluc_rl.tiny import build_tiny_model


def make_streams(batch: int, steps: int, vocab: int, bt: int, low: int, seed: int = 0):
    """Prompts of 12-32 random tokens and [B, S] actions with 25% backtracks (none in the first 4 steps)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(low, vocab, (int(n),), generator=g).tolist()
               for n in torch.randint(12, 33, (batch,), generator=g)]
    actions = torch.randint(low, vocab, (batch, steps), generator=g)
    actions = torch.where(torch.rand(batch, steps, generator=g) < 0.25, bt, actions)
    actions[:, :4] = torch.randint(low, vocab, (batch, 4), generator=g)
    return prompts, actions


def causal_batch(prompts, completions):
    """Right-padded prompt + completion ids [B, L], mask [B, L], and the completion tokens' label layout [B, L]."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        mask[b, : len(p) + len(c)] = 1
        labels[b, len(p) : len(p) + len(c)] = torch.tensor(c)
    return ids, mask, labels


def plain_forward_backward(model, ids, mask, labels) -> None:
    """Causal forward, log-probs of the completion tokens (fp32 log-softmax at their predictors), backward."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # [B, L-1, V]
    target = labels[:, 1:]  # [B, L-1]
    keep = target != -100
    logp = torch.log_softmax(logits[keep].float(), -1).gather(-1, target[keep].unsqueeze(-1))  # [N, 1]
    logp.sum().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--model", default="tiny-random", help="tiny-random (default) or a model name/path")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.model == "tiny-random":
        model, vocab, bt, low = build_tiny_model("llama", vocab_size=512, hidden_size=256, num_layers=4), 512, 4, 5
        set_policy_backtrack(model, bt)
    else:
        model, tokenizer, bt = load_model_and_tokenizer(args.model)
        vocab, low = len(tokenizer), 100
    model.eval()  # no dropout: both sides compute the same quantities
    prompts, actions = make_streams(args.batch, args.steps, vocab, bt, low)
    typed = [[a for a in row if a != bt] for row in actions.tolist()]  # the tokens our packing feeds
    ids, mask, labels = causal_batch(prompts, typed)
    tokens = int(mask.sum())

    def ours():
        model.zero_grad(set_to_none=True)
        score_actions(model, prompts, actions).logprobs.sum().backward()

    def baseline():
        model.zero_grad(set_to_none=True)
        plain_forward_backward(model, ids, mask, labels)

    t = best_times({"ours": ours, "plain": baseline}, args.repeats)
    n = args.batch * args.steps
    results = {"model": args.model, "batch": args.batch, "actions": args.steps, "backtrack_share": 0.25,
               "input_tokens": tokens, "threads": torch.get_num_threads(),
               "scorer_tok_s": tokens / t["ours"], "scorer_actions_s": n / t["ours"],
               "plain_forward_backward_tok_s": tokens / t["plain"], "scoring_vs_forward": t["plain"] / t["ours"]}
    print(f"{args.model}: batch {args.batch}, {args.steps} actions (25% backtracks), {tokens} input tokens, "
          "forward+backward")
    print(f"  plain causal forward+backward  {tokens / t['plain']:8.0f} tok/s")
    print(f"  action-stream scorer           {tokens / t['ours']:8.0f} tok/s  ({t['plain'] / t['ours']:.2f}x; "
          f"{n / t['ours']:.0f} actions/s)")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
