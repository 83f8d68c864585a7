"""Generation speed: backtrack-aware decoding vs ``model.generate``, a plain forward loop and naive re-encoding.

Same tiny Llama (about 2.6M parameters, random weights), same prompts, 128 new tokens, batch 1 and 32, greedy. Prints a
table and, as its last line, one JSON object with the figures and their ratios:

    python benchmarks/generation.py [--repeats 3] [--new-tokens 128] [--batches 1,32] [--model NAME]

``--model`` benchmarks a real model instead (a name or path that ``halluc_rl.modeling.load_model_and_tokenizer``
takes, e.g. ``smollm2-135m`` after ``halluc-rl models get smollm2-135m``), with its own vocabulary and backtrack id:
prompts are random non-special token ids of that vocabulary.

Figures: tokens (actions) per second, best of ``--repeats`` runs after a warm-up, the candidates timed round-robin
so that drift in the machine's speed hits them alike.
* ``speedup_vs_generate_b{1,32}``: ours with no backtrack fired / ``model.generate``.
* ``backtrack_cost_ratio``: seconds per action with 25% of actions forced to be backtracks (rows differing) /
  seconds per action with none, at the largest batch.
* ``naive_cost_ratio``: the same 25% pattern decoded by re-encoding every row's prefix after each backspace /
  ours, at the largest batch.
The plain loop and the naive re-encoder compute logits for the last position only (``logits_to_keep=1``), as
``model.generate`` and ours do, so a large vocabulary does not inflate them.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from halluc_rl.generation import generate
from halluc_rl.tiny import build_tiny_model

VOCAB, BT, PAD = 512, 4, 0


class _Tok:
    """The few tokenizer attributes generation reads; the benchmark feeds token ids directly."""

    def __init__(self, pad_token_id: int = PAD, eos_token_id: int = 2):
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id

    def batch_decode(self, seqs, skip_special_tokens=True):
        return ["" for _ in seqs]


@dataclass
class BenchModel:
    """A model under benchmark and the ids the harness needs: prompts are drawn from ``[low, high)``."""

    model: torch.nn.Module
    bt: int
    pad: int
    low: int
    high: int
    label: str

    @property
    def tok(self) -> _Tok:
        return _Tok(self.pad)


def load_bench_model(name: str | None = None) -> BenchModel:
    """The default tiny random Llama (``name=None``), or a real model with its backtrack token added."""
    torch.manual_seed(0)
    if name is None:
        model = build_tiny_model("llama", vocab_size=VOCAB, hidden_size=256, num_layers=4)
        params = sum(p.numel() for p in model.parameters())
        return BenchModel(model, BT, PAD, 5, VOCAB, f"tiny Llama, {params / 1e6:.2f}M parameters")
    from halluc_rl.modeling import load_model_and_tokenizer

    model, tok, bt = load_model_and_tokenizer(name)
    model.eval()
    special = set(tok.all_special_ids) | {int(t) for t in tok.added_tokens_decoder}  # e.g. <|im_start|>, <|BACKTRACK|>
    low = max((i for i in special if i < bt), default=-1) + 1  # above the leading block of special tokens
    high = min(i for i in special | {len(tok)} if i >= low)  # below the first special token after it
    params = sum(p.numel() for p in model.parameters())
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    return BenchModel(model, bt, pad, low, high, f"{name} ({type(model).__name__}), {params / 1e6:.1f}M parameters, "
                      f"vocabulary {model.get_input_embeddings().weight.shape[0]:,}")


def make_prompts(batch: int, seed: int = 0, low: int = 5, high: int = VOCAB,
                 pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(12, 33, (batch,), generator=g)
    width = int(lengths.max())
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for b, n in enumerate(lengths.tolist()):
        ids[b, width - n :] = torch.randint(low, high, (n,), generator=g)
        mask[b, width - n :] = 1
    return ids, mask


def best_time(fn, repeats: int) -> float:
    """Best of ``repeats`` timed calls after a warm-up."""
    return best_times({"fn": fn}, repeats)["fn"]


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    """Best time of each function, measured round-robin (one call of each per round) so that drift in the
    machine's speed hits every candidate alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


@torch.no_grad()
def plain_loop(model, ids, mask, steps):
    """The physical floor: a cached greedy decode with nothing else."""
    cache = DynamicCache(config=model.config)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                   logits_to_keep=1).logits[:, -1]
    nxt_pos = pos[:, -1:] + 1
    for _ in range(steps - 1):
        tok = logits.argmax(-1, keepdim=True)
        mask = torch.cat([mask, torch.ones_like(tok)], 1)
        logits = model(input_ids=tok, attention_mask=mask, position_ids=nxt_pos, past_key_values=cache).logits[:, -1]
        nxt_pos = nxt_pos + 1


@torch.no_grad()
def naive_reencode(model, ids, mask, forced, steps, bt: int = BT, pad: int = PAD):
    """Backspaces the naive way: after any backspace, re-encode every row's visible prefix from scratch."""
    batch = ids.shape[0]
    prompts = [ids[b][mask[b].bool()].tolist() for b in range(batch)]
    visible: list[list[int]] = [[] for _ in range(batch)]

    def encode():
        seqs = [p + v for p, v in zip(prompts, visible)]
        width = max(map(len, seqs))
        x = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        m = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
        cache = DynamicCache(config=model.config)
        pos = (m.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=x, attention_mask=m, position_ids=pos, past_key_values=cache, logits_to_keep=1)
        return out.logits[:, -1], cache, m, pos[:, -1:] + 1

    logits, cache, m, nxt = encode()
    for s in range(steps):
        action = torch.where(forced[:, s] >= 0, forced[:, s], logits.argmax(-1))
        popped = False
        for b, a in enumerate(action.tolist()):
            if a == bt:
                if visible[b]:
                    visible[b].pop()
                popped = True
            else:
                visible[b].append(a)
        if s == steps - 1:
            break
        if popped:
            logits, cache, m, nxt = encode()
        else:
            m = torch.cat([m, torch.ones(batch, 1, dtype=torch.long)], 1)
            out = model(input_ids=action.unsqueeze(1), attention_mask=m, position_ids=nxt, past_key_values=cache)
            logits, nxt = out.logits[:, -1], nxt + 1


def measure(bm: BenchModel, batch: int, steps: int, repeats: int, naive_repeats: int | None = None) -> dict[str, float]:
    """All figures for one batch size."""
    model, bt, pad, tok = bm.model, bm.bt, bm.pad, bm.tok
    no_bt = dict(max_new_tokens=steps, backtrack_bias=float("-inf"), eos_token_id=[], loop_guard=None)
    ids, mask = make_prompts(batch, low=bm.low, high=bm.high, pad=pad)
    enc = {"input_ids": ids, "attention_mask": mask}
    g = torch.Generator().manual_seed(batch)
    forced = torch.where(torch.rand(batch, steps, generator=g) < 0.25, bt, -1)  # rows differ
    forced[:, :4] = -1  # let every row write a few tokens first
    n = batch * steps
    t = best_times({
        "generate": lambda: model.generate(**enc, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                                           pad_token_id=pad, eos_token_id=None, suppress_tokens=[bt]),
        "ours": lambda: generate(model, tok, enc, backtrack_id=bt, **no_bt),
        "floor": lambda: plain_loop(model, ids, mask, steps),
        "bt": lambda: generate(model, tok, enc, backtrack_id=bt, forced_actions=forced, **no_bt),
    }, repeats)
    t_gen, t_ours, t_floor, t_bt = t["generate"], t["ours"], t["floor"], t["bt"]
    figures = {
        "generate_tok_s": n / t_gen,
        "ours_tok_s": n / t_ours,
        "plain_loop_tok_s": n / t_floor,
        "ours_25pct_bt_actions_s": n / t_bt,
        "speedup_vs_generate": t_gen / t_ours,
        "plain_loop_vs_generate": t_gen / t_floor,
        "backtrack_cost_ratio": t_bt / t_ours,
    }
    naive_repeats = max(1, repeats // 2) if naive_repeats is None else naive_repeats
    if naive_repeats > 0:  # 0 skips it: on a real model at batch 8 it takes minutes per run
        t_naive = best_time(lambda: naive_reencode(model, ids, mask, forced, steps, bt, pad), naive_repeats)
        figures.update(naive_25pct_bt_actions_s=n / t_naive, naive_cost_ratio=t_naive / t_bt)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    parser.add_argument("--model", default=None,
                        help="a real model to load (e.g. smollm2-135m); default: the tiny random Llama")
    parser.add_argument("--naive-repeats", type=int, default=None,
                        help="timed runs of the naive re-encoder (default repeats // 2, at least 1; 0 skips it)")
    args = parser.parse_args()
    steps = args.new_tokens
    batches = [int(b) for b in args.batches.split(",")]
    bm = load_bench_model(args.model)
    params = sum(p.numel() for p in bm.model.parameters())
    results: dict[str, float] = {"model": args.model or "tiny-random", "params": params, "new_tokens": steps,
                                 "threads": torch.get_num_threads()}
    rows = []
    for batch in batches:
        figures = measure(bm, batch, steps, args.repeats, args.naive_repeats)
        results.update({f"{k}_b{batch}": v for k, v in figures.items()})
        rows.append((batch, *(figures.get(k, float("nan")) for k in (
            "generate_tok_s", "ours_tok_s", "plain_loop_tok_s", "ours_25pct_bt_actions_s", "naive_25pct_bt_actions_s"))))
    largest = max(batches)
    results["backtrack_cost_ratio"] = results[f"backtrack_cost_ratio_b{largest}"]
    if f"naive_cost_ratio_b{largest}" in results:
        results["naive_cost_ratio"] = results[f"naive_cost_ratio_b{largest}"]

    print(f"{bm.label}, {steps} new tokens, greedy, {torch.get_num_threads()} threads")
    print(f"{'batch':>5} | {'generate':>10} | {'ours':>10} | {'plain loop':>10} | {'ours 25% BT':>11} | {'naive 25% BT':>12}")
    print(f"{'':>5} | {'tok/s':>10} | {'tok/s':>10} | {'tok/s':>10} | {'actions/s':>11} | {'actions/s':>12}")
    for batch, *vals in rows:
        print(f"{batch:>5} | " + " | ".join(f"{v:>10.1f}" for v in vals[:3]) + f" | {vals[3]:>11.1f} | {vals[4]:>12.1f}")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in results.items()}))


if __name__ == "__main__":
    main()
