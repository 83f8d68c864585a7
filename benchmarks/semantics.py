"""The two backtrack semantics head to head: ``retry`` (every action stays in the context) vs ``rewind``.

Same tiny random Llama as benchmarks/generation.py (about 2.6M parameters), prompts of 12-32 tokens, 128 actions
per row of which 25% are forced backtracks (rows differing), greedy otherwise:

    python benchmarks/semantics.py [--repeats 5] [--batch 32] [--steps 128] [--model NAME]

* ``retry_vs_rewind_b32``: actions/s of ``generate(..., semantics="retry")`` / actions/s of the same forced actions
  under ``rewind``, at the batch size given (target >= 0.95). ``retry`` feeds every action, a backtrack too, as a
  plain cached step and never crops or compacts; ``rewind`` rewinds the rows that backtrack. The context length
  (cache slots) and the key/value memory each holds at the end are reported beside it.
* ``retry_scoring_vs_forward``: a plain causal forward+backward of the same token streams (prompt + every action,
  backtracks included) / the ``retry`` scorer (:func:`halluc_rl.scoring.score_actions`: the replay of the decoding
  rules, one causal forward, log-probs, backward) (target >= 0.95).

Timed round-robin, best of ``--repeats`` after a warm-up. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generation import best_times, load_bench_model, make_prompts  # noqa: E402
from scoring import causal_batch, make_streams, plain_forward_backward  # noqa: E402

from halluc_rl.backtrack import EpisodeEnd  # noqa: E402
from halluc_rl.decoding import BacktrackGenerationConfig  # noqa: E402
from halluc_rl.engine import DecodeEngine  # noqa: E402
from halluc_rl.generation import generate  # noqa: E402
from halluc_rl.policy import set_policy_backtrack  # noqa: E402
from halluc_rl.scoring import score_actions  # noqa: E402


def cache_footprint(bm, ids, mask, forced, steps: int, semantics: str) -> tuple[int, int]:
    """(cache slots, key/value bytes) after decoding ``forced`` in ``semantics`` (one untimed run)."""
    config = BacktrackGenerationConfig(max_new_tokens=steps, eos_token_id=[], loop_guard=None)
    engine = DecodeEngine(bm.model, bm.tok, config, backtrack_id=bm.bt, head="softmax", pad=bm.pad,
                          end=EpisodeEnd([], (), steps), forced_actions=forced, semantics=semantics)
    with torch.inference_mode():
        engine.run(ids, mask)
    size = sum(t.numel() * t.element_size() for layer in engine.cache.cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor))
    return engine.cache.cache.get_seq_length(), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=128)
    parser.add_argument("--model", default=None,
                        help="a real model (e.g. smollm2-135m); default: the tiny random Llama")
    args = parser.parse_args()
    bm = load_bench_model(args.model)
    model, batch, steps = bm.model.eval(), args.batch, args.steps
    set_policy_backtrack(model, bm.bt)
    ids, mask = make_prompts(batch, low=bm.low, high=bm.high, pad=bm.pad)
    g = torch.Generator().manual_seed(1)
    forced = torch.where(torch.rand(batch, steps, generator=g) < 0.25, bm.bt, -1)  # rows differ
    forced[:, :4] = -1  # every row writes a few tokens first
    enc = {"input_ids": ids, "attention_mask": mask}
    kw = dict(max_new_tokens=steps, forced_actions=forced, eos_token_id=[], loop_guard=None, backtrack_id=bm.bt)
    t = best_times({"rewind": lambda: generate(model, bm.tok, enc, semantics="rewind", **kw),
                    "retry": lambda: generate(model, bm.tok, enc, semantics="retry", **kw)}, args.repeats)
    n = batch * steps
    slots = {s: cache_footprint(bm, ids, mask, forced, steps, s) for s in ("rewind", "retry")}

    prompts, actions = make_streams(batch, steps, bm.high, bm.bt, bm.low)
    streams = [p + a for p, a in zip(prompts, actions.tolist())]  # what retry feeds: every action
    c_ids, c_mask, c_labels = causal_batch(prompts, [a for a in actions.tolist()])
    tokens = int(c_mask.sum())

    def ours():
        model.zero_grad(set_to_none=True)
        score_actions(model, prompts, actions, semantics="retry").logprobs.sum().backward()

    def plain():
        model.zero_grad(set_to_none=True)
        plain_forward_backward(model, c_ids, c_mask, c_labels)

    s = best_times({"retry": ours, "plain": plain}, args.repeats)
    assert tokens == sum(map(len, streams))
    results = {
        "model": args.model or "tiny-random", "batch": batch, "actions": steps, "backtrack_share": 0.25,
        "threads": torch.get_num_threads(),
        "rewind_actions_s": n / t["rewind"], "retry_actions_s": n / t["retry"],
        f"retry_vs_rewind_b{batch}": t["rewind"] / t["retry"],
        "rewind_cache_slots": slots["rewind"][0], "retry_cache_slots": slots["retry"][0],
        "rewind_cache_mib": slots["rewind"][1] / 2**20, "retry_cache_mib": slots["retry"][1] / 2**20,
        "retry_scorer_tok_s": tokens / s["retry"], "plain_forward_backward_tok_s": tokens / s["plain"],
        "retry_scoring_vs_forward": s["plain"] / s["retry"],
    }
    print(f"{bm.label}: batch {batch}, {steps} actions (25% backtracks), {torch.get_num_threads()} threads")
    print(f"  generation   rewind {n / t['rewind']:8.0f} actions/s   retry {n / t['retry']:8.0f} actions/s   "
          f"({t['rewind'] / t['retry']:.2f}x)")
    print(f"  cache        rewind {slots['rewind'][0]:4d} slots {slots['rewind'][1] / 2**20:6.2f} MiB   "
          f"retry {slots['retry'][0]:4d} slots {slots['retry'][1] / 2**20:6.2f} MiB")
    print(f"  scoring      plain causal fwd+bwd {tokens / s['plain']:8.0f} tok/s   retry scorer "
          f"{tokens / s['retry']:8.0f} tok/s  ({s['plain'] / s['retry']:.2f}x)")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
