"""Where a fresh backtrack token starts, under each backtrack head (docs/real_model.md, *the cost of masked SFT*).

    OMP_NUM_THREADS=1 python benchmarks/head_init.py smollm2-135m --task arithmetic --num_problems 32

Loads MODEL with the backtrack token added as training adds it (``add_backtrack_token``: the mean of the init words'
rows), runs one forward over the reference solutions of ``--num_problems`` training problems, and reports the
backtrack probability at every response position under the ``softmax`` head (one more vocabulary entry) and under
the ``factorized`` head (sigmoid of the same logit: halluc_rl.losses). A factorised policy whose P(backtrack) starts
near 1 must unlearn that before it can write anything, and SFT spends its first steps on it. The last line is one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from halluc_rl.data.problems import encode_problem
from halluc_rl.data.tasks import load_problems
from halluc_rl.losses import action_log_probs
from halluc_rl.modeling import load_policy


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model name (smollm2-135m, tiny, tiny-deps) or a saved policy folder")
    parser.add_argument("--task", default="arithmetic", help="the task whose reference solutions are scored")
    parser.add_argument("--num_problems", type=int, default=32)
    args = parser.parse_args()
    began = time.time()
    model, tokenizer, bt = load_policy(args.model, add_missing_backtrack=True)
    model.eval()
    probs: dict[str, list[float]] = {"softmax": [], "factorized": []}
    with torch.no_grad():
        for problem in load_problems(args.task, "train", args.num_problems, seed=0):
            prompt, response = encode_problem(problem, tokenizer)
            logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1]  # [R, V]
            for head, values in probs.items():
                values += action_log_probs(logits, bt, head)[:, bt].exp().tolist()  # [R] P(backtrack)
    result = {"model": args.model, "task": args.task, "positions": len(probs["softmax"]),
              **{f"p_backtrack_{head}_mean": float(f"{statistics.fmean(v):.4g}") for head, v in probs.items()},
              **{f"p_backtrack_{head}_median": float(f"{statistics.median(v):.4g}") for head, v in probs.items()},
              "factorized_share_above_half": round(sum(p > 0.5 for p in probs["factorized"]) / len(probs["factorized"]),
                                                   4),
              "seconds": round(time.time() - began, 1)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
