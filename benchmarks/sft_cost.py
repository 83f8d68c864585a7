"""What masked-error SFT costs a model, run by run: the table and loss curves of docs/real_model.md (issue 21).

    python benchmarks/sft_cost.py ROOT plain masked headonly errorsonly rate10 budget plain192 calibrated \
        --plot docs/smollm2_sft_cost.png

Each NAME is an SFT run folder ``ROOT/NAME`` (``halluc-rl sft ... --output_dir ROOT/NAME``) whose evaluation lies in
``ROOT/eval-NAME`` (``halluc-rl eval --policy ROOT/NAME ... --output_dir ROOT/eval-NAME --name NAME``). It prints
one markdown row per run: the settings that tell the runs apart (read from the run's ``config.yaml``), the training
loss early and at the end (``log_history.json``), the reference NLL and the accuracies and backtrack figures of the
evaluation (``results.json``). ``--plot`` draws the training losses on a log scale. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from halluc_rl.reporting import markdown_table, save_png


def run_row(root: Path, name: str) -> dict:
    """The settings, loss curve and evaluation of one run (a clear error if a file is missing)."""
    folder, evaluation = root / name, root / f"eval-{name}" / "results.json"
    for path in (folder / "config.yaml", folder / "log_history.json", evaluation):
        if not path.is_file():
            raise SystemExit(f"sft_cost: {path} is missing; train and evaluate {name!r} first (see the docstring)")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    history = json.loads((folder / "log_history.json").read_text())
    losses = {h["step"]: h["loss"] for h in history if "loss" in h}
    result = json.loads(evaluation.read_text())["results"][name]
    rate = 0.0 if config["error_source"] == "none" else config["error_rate"]
    return {"name": name, "error_rate": rate, "head": config["backtrack_head"], "steps": max(h["step"] for h in history),
            "losses": losses, "first_loss": losses[min(losses)], "final_loss": losses[max(losses)],
            "reference_nll": result["reference_nll"], "greedy": result["accuracy_greedy"],
            "sampled": result["accuracy_sampled"], "sampled_backtrack_rate": result["sampled_backtrack_rate"],
            "sampled_precision": result["sampled_backtrack_precision"],
            "greedy_precision": result["backtrack_precision"]}


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder holding NAME and eval-NAME for every run")
    parser.add_argument("names", nargs="+", help="run names, in table order")
    parser.add_argument("--plot", type=Path, default=None, help="a PNG of the training losses")
    args = parser.parse_args()
    rows = [run_row(args.root, name) for name in args.names]
    header = ["run", "error rate", "head", "steps", "first loss", "final loss", "reference NLL", "greedy",
              "sampled", "sampled BT rate", "precision greedy / sampled"]
    print(markdown_table(header, [[r["name"], f"{r['error_rate']:g}", r["head"], str(r["steps"]),
                                   fmt(r["first_loss"], 2), fmt(r["final_loss"]), fmt(r["reference_nll"]),
                                   fmt(r["greedy"]), fmt(r["sampled"]), fmt(r["sampled_backtrack_rate"]),
                                   f"{fmt(r['greedy_precision'], 2)} / {fmt(r['sampled_precision'], 2)}"]
                                  for r in rows], numeric_from=3))
    if args.plot is not None:
        fig = Figure(figsize=(7, 4.4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for r in rows:
            steps = sorted(r["losses"])
            ax.plot(steps, [r["losses"][s] for s in steps], marker=".",
                    label=f"{r['name']} (R {r['error_rate']:g}, {r['head']})")
        ax.set(xlabel="SFT step (batch 8)", ylabel="training loss (log scale)", yscale="log",
               title="SmolLM2-135M, masked-error SFT on arithmetic")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        save_png(fig, args.plot)
    print(json.dumps({r["name"]: {k: v for k, v in r.items() if k != "losses"} for r in rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
