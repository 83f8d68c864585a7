"""Branching cost: K continuations from each of N cached states vs N*K continuations from a prefilled batch.

Tiny Llama (about 2.6M parameters, as in benchmarks/generation.py). N = 16 states (prompts of 12-32 tokens plus a
written response of 32 tokens), K = 4 branches each, 64 sampled actions per branch:

    python benchmarks/branching.py [--repeats 5] [--states 16] [--branches 4] [--steps 64]

* ours: ``generate(prompts, responses=..., num_branches=K)``: one prefill of the N states, a fork of their KV
  caches into N*K rows, then the decode. The prefill is counted.
* baseline: the same N*K rows decoded from a batch that is already prefilled: ``generate`` on the N*K full
  states, minus the time of their prefill alone (measured in the same run).

``branch_cost_ratio`` = ours / baseline (target <= 1.1). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generation import BT, PAD, VOCAB, _Tok, best_times, make_prompts  # noqa: E402

from halluc_rl.cache import RewindableCache  # noqa: E402
from halluc_rl.generation import generate  # noqa: E402
from halluc_rl.policy import set_policy_backtrack
from halluc_rl.tiny import build_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--states", type=int, default=16)
    parser.add_argument("--branches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--written", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_tiny_model("llama", vocab_size=VOCAB, hidden_size=256, num_layers=4)
    set_policy_backtrack(model, BT)
    n, k = args.states, args.branches
    ids, mask = make_prompts(n)
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(n)]
    g = torch.Generator().manual_seed(1)
    written = [torch.randint(5, VOCAB, (args.written,), generator=g).tolist() for _ in range(n)]
    full = [p + w for p, w in zip(prompts, written) for _ in range(k)]  # the N*K states, each written out
    tok = _Tok()
    kw = dict(max_new_tokens=args.steps, do_sample=True, eos_token_id=[], loop_guard=None, backtrack_bias=-1.0)

    def ours():
        generate(model, tok, prompts, responses=written, num_branches=k, generator=torch.Generator().manual_seed(0),
                 **kw)

    def baseline_total():
        generate(model, tok, full, generator=torch.Generator().manual_seed(0), **kw)

    width = max(map(len, full))
    full_ids = torch.full((n * k, width), PAD, dtype=torch.long)
    full_mask = torch.zeros_like(full_ids)
    for b, row in enumerate(full):
        full_ids[b, width - len(row):] = torch.tensor(row)
        full_mask[b, width - len(row):] = 1

    def prefill_only():
        with torch.inference_mode():
            RewindableCache(model).prefill(full_ids, full_mask)

    t = best_times({"ours": ours, "baseline_total": baseline_total, "prefill": prefill_only}, args.repeats)
    baseline = t["baseline_total"] - t["prefill"]
    actions = n * k * args.steps
    results = {"states": n, "branches": k, "steps": args.steps, "written": args.written,
               "threads": torch.get_num_threads(), "ours_s": t["ours"], "baseline_decode_s": baseline,
               "baseline_prefill_s": t["prefill"], "ours_actions_s": actions / t["ours"],
               "baseline_actions_s": actions / baseline, "branch_cost_ratio": t["ours"] / baseline}
    print(f"{n} states x {k} branches x {args.steps} actions ({args.written} tokens written per state)")
    print(f"  baseline: decode {n * k} prefilled rows  {baseline:.3f}s (its prefill alone: {t['prefill']:.3f}s)")
    print(f"  ours: prefill {n} states, fork, decode  {t['ours']:.3f}s  ({t['ours'] / baseline:.3f}x)")
    print(json.dumps({k_: round(v, 4) if isinstance(v, float) else v for k_, v in results.items()}))


if __name__ == "__main__":
    main()
