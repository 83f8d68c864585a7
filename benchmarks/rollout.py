"""Rollout speed: the batched rollout driver vs plain generation, and what a process reward model adds.

Tiny Llama policy (about 2.6M parameters, as in benchmarks/generation.py), batch 32, 128 actions with 25% of
actions forced to be backtracks (rows differing):

    python benchmarks/rollout.py [--repeats 5] [--batch 32] [--steps 128] [--model NAME]

``--model`` uses a real policy instead (e.g. ``smollm2-135m``, loaded with
``halluc_rl.modeling.load_model_and_tokenizer``: its vocabulary, its backtrack id); the PRM stays the tiny random
one, with the policy's vocabulary size so that it reads the same token ids.

* ``rollout_vs_generation``: env steps (actions) per second of :func:`halluc_rl.rollout.rollout` with the rule
  grader / tokens per second of plain generation (no backtracks, same model, batch, length). Target >= 0.9.
* ``prm_overhead_vs_prm_forward``: (rollout with an incremental PRM in the loop - rollout without) / the time of
  the PRM's own forward passes alone (a plain cached decode of the same length with the PRM). Target <= 1.0x
  plus noise: the PRM costs its forwards and no re-encoding.
* ``prm_naive_reencode_s``: what re-encoding every prefix with the PRM after each action would cost, for scale.
The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForTokenClassification

sys.path.insert(0, str(Path(__file__).parent))
from generation import best_time, best_times, load_bench_model, make_prompts, plain_loop  # noqa: E402

from halluc_rl.data.problems import Problem  # noqa: E402
from halluc_rl.generation import generate  # noqa: E402
from halluc_rl.rewards import HFProcessReward, RewardMixer, RuleGrader  # noqa: E402
from halluc_rl.rollout import rollout  # noqa: E402
from halluc_rl.tiny import tiny_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--model", default=None,
                        help="a real policy to load (e.g. smollm2-135m); default: the tiny random Llama")
    args = parser.parse_args()
    bm = load_bench_model(args.model)  # seeds torch with 0, as before
    policy, bt, tok = bm.model, bm.bt, bm.tok
    vocab = policy.get_input_embeddings().weight.shape[0]
    prm_model = AutoModelForTokenClassification.from_config(
        tiny_config("llama", vocab_size=vocab, hidden_size=256, num_layers=4, num_labels=2)).eval()
    ids, mask = make_prompts(args.batch, low=bm.low, high=bm.high, pad=bm.pad)
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(args.batch)]
    problems = [Problem(f"question {b}", "#### 1", "1") for b in range(args.batch)]
    g = torch.Generator().manual_seed(args.batch)
    forced = torch.where(torch.rand(args.batch, args.steps, generator=g) < 0.25, bt, -1)
    forced[:, :4] = -1
    kw = dict(max_new_tokens=args.steps, backtrack_bias=float("-inf"), eos_token_id=[], loop_guard=None)
    n = args.batch * args.steps

    def run(mixer):
        return rollout(policy, tok, problems, mixer, prompt_ids=prompts, forced_actions=forced, backtrack_id=bt, **kw)

    t = best_times({
        "gen": lambda: generate(policy, tok, {"input_ids": ids, "attention_mask": mask}, backtrack_id=bt, **kw),
        "roll": lambda: run(RewardMixer([RuleGrader()])),
        "prm": lambda: run(RewardMixer([RuleGrader(), HFProcessReward(prm_model)])),
        "prm_fwd": lambda: plain_loop(prm_model, ids, mask, args.steps),
    }, args.repeats)
    t_gen, t_roll, t_prm, t_prm_fwd = t["gen"], t["roll"], t["prm"], t["prm_fwd"]

    @torch.no_grad()
    def naive_prm_one_step():  # re-encode every row's full prefix once, as a naive PRM would after each action
        width = ids.shape[1] + args.steps // 2
        prm_model(input_ids=torch.randint(bm.low, bm.high, (args.batch, width)))

    t_naive_step = best_time(naive_prm_one_step, args.repeats)
    results = {
        "model": args.model or "tiny-random", "batch": args.batch, "actions": args.steps, "backtrack_share": 0.25,
        "generation_tok_s": n / t_gen,
        "rollout_actions_s": n / t_roll,
        "rollout_with_prm_actions_s": n / t_prm,
        "rollout_vs_generation": t_gen / t_roll,
        "prm_added_s": t_prm - t_roll,
        "prm_forward_s": t_prm_fwd,
        "prm_overhead_vs_prm_forward": (t_prm - t_roll) / t_prm_fwd,
        "prm_naive_reencode_s": t_naive_step * args.steps,
    }
    print(f"{bm.label}; batch {args.batch}, {args.steps} actions, 25% backtracks, {torch.get_num_threads()} threads")
    print(f"  plain generation     {n / t_gen:8.0f} tok/s")
    print(f"  rollout driver       {n / t_roll:8.0f} actions/s  ({t_gen / t_roll:.2f}x generation)")
    print(f"  rollout + PRM        {n / t_prm:8.0f} actions/s  (PRM adds {t_prm - t_roll:.2f}s; its own forwards "
          f"take {t_prm_fwd:.2f}s; naive re-encoding would take {t_naive_step * args.steps:.1f}s)")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
