"""Tables, plots and results files: the one home of every report the commands write.

* :func:`markdown_table` and :func:`cell` render every markdown table (``halluc-rl eval``, the demo, the
  ablation, ``halluc-rl prm eval``), so a number prints the same way everywhere;
* stage reports: :func:`format_table`, :func:`print_table`, :func:`plot_accuracy`, :func:`write_report` (``{stage:
  metrics}`` to ``results.{json,md,png}``) and :func:`load_results` (read it back, to add a row);
* the demo's extras: :func:`plot_rl` (backtrack use and precision during RL) and :func:`demo_summary` (what
  backtracking bought);
* the ablation's: :func:`mean_std`, :func:`ablation_table` and :func:`plot_ablation` (figures over seeds).

Plots use matplotlib's Agg canvas on a ``Figure`` of their own: pyplot and the global backend are never touched.
"""

from __future__ import annotations

import io
import json
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from halluc_rl.atomic import atomic_write_bytes, atomic_write_text

ACCURACY_KEYS: tuple[str, ...] = (
    "accuracy_greedy", "accuracy_sampled", "accuracy_greedy_no_backtrack", "accuracy_sampled_no_backtrack",
)
"""The four accuracies :func:`halluc_rl.evaluation.evaluate_policy` reports (and the report plots)."""

REPORT_COLUMNS: tuple[str, ...] = (
    *ACCURACY_KEYS, "backtrack_rate", "backtrack_precision", "false_backtrack_rate", "tokens_per_solved",
    "num_problems",
)
"""Columns of the report table, in order (after the stage name)."""

SHORT_NAMES: dict[str, str] = {
    "accuracy_greedy": "acc greedy", "accuracy_sampled": "acc sampled",
    "accuracy_greedy_no_backtrack": "acc greedy no-BT", "accuracy_sampled_no_backtrack": "acc sampled no-BT",
    "backtrack_rate": "BT rate", "backtrack_precision": "BT precision", "false_backtrack_rate": "false BT rate",
    "tokens_per_solved": "tokens/solved", "num_problems": "problems",
}
"""Column headers of the terminal table (the markdown table keeps the metric keys)."""

PLOT_LABELS: dict[str, str] = {
    "accuracy_greedy": "greedy", "accuracy_greedy_no_backtrack": "greedy, no backtrack",
    "accuracy_sampled": "sampled", "accuracy_sampled_no_backtrack": "sampled, no backtrack",
}
"""The bars of :func:`plot_accuracy`, in order, and their legend labels."""

# ----------------------------------------------------------------------------------------------------------------
# Table text
# ----------------------------------------------------------------------------------------------------------------


def cell(key: str, value: Any) -> str:
    """One table cell: accuracies and rates with 3 decimals, token counts with 1, missing values as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "tokens_per_solved":
        return f"{float(value):.1f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int | None = None) -> str:
    """A markdown table (no final newline); columns from index ``numeric_from`` on are right-aligned (None:
    none is)."""
    right = len(header) if numeric_from is None else numeric_from
    rule = ["---" if i < right else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def stage_rows(results: Mapping[str, Mapping[str, Any]], columns: Sequence[str]) -> list[list[str]]:
    """One row of cells per stage: its name, then each column's :func:`cell`."""
    return [[str(stage), *(cell(c, metrics.get(c)) for c in columns)] for stage, metrics in results.items()]


def format_table(results: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = REPORT_COLUMNS) -> str:
    """A markdown table: one row per stage (in the dict's order), one column per metric."""
    return markdown_table(["stage", *columns], stage_rows(results, columns), numeric_from=1) + "\n"


def print_table(results: Mapping[str, Mapping[str, Any]], title: str = "halluc-rl evaluation",
                columns: Sequence[str] = REPORT_COLUMNS) -> None:
    """Print the report table to stdout: a ``rich`` table when rich is installed, else the markdown text."""
    try:  # optional at run time: the markdown text stands in
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"{title}\n\n{format_table(results, columns)}")
        return
    table = Table(title=title)
    table.add_column("stage", no_wrap=True)
    for c in columns:
        table.add_column(SHORT_NAMES.get(c, c), justify="right")
    for row in stage_rows(results, columns):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)


# ----------------------------------------------------------------------------------------------------------------
# Stage reports: results.{json,md,png}
# ----------------------------------------------------------------------------------------------------------------


def save_png(fig: Figure, path: Path, dpi: int = 110) -> Path:
    """Write the figure to ``path`` as a PNG, atomically (a reader never sees half a file)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _canvas(figsize: tuple[float, float]) -> Figure:
    """A figure on its own Agg canvas."""
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_accuracy(results: Mapping[str, Mapping[str, Any]], path: str | Path | io.BytesIO,
                  title: str = "halluc-rl evaluation") -> str | Path | io.BytesIO:
    """A grouped bar plot (PNG, Agg backend): per stage, greedy and sampled accuracy with and without backtracking.

    Missing values are left out (no bar); the pyplot state and the global backend are not touched.
    """
    stages = list(results)
    keys = list(PLOT_LABELS)
    width = 0.8 / len(keys)
    fig = _canvas((max(6.0, 1.6 * len(stages) + 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for j, key in enumerate(keys):
        xs, ys = [], []
        for i, stage in enumerate(stages):
            value = results[stage].get(key)
            if value is not None and not math.isnan(float(value)):
                xs.append(i + (j - (len(keys) - 1) / 2) * width)
                ys.append(float(value))
        ax.bar(xs, ys, width=width, label=PLOT_LABELS[key], hatch="//" if "no_backtrack" in key else None,
               color=f"C{j // 2}", alpha=1.0 if "no_backtrack" not in key else 0.55)
    ax.set_xticks(range(len(stages)))
    ax.set_xticklabels(stages)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    return path


def write_report(results: Mapping[str, Mapping[str, Any]], out_dir: str | Path,
                 title: str = "halluc-rl evaluation", summary: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """Write ``results`` (stage name -> metrics dict, any number of stages) to ``out_dir``.

    Files: ``results.json`` (``{"title", "created", "results"}`` with ``results`` as given, and ``summary`` when
    given, e.g. the demo's :func:`summary_figures`; read the results back with :func:`load_results`), ``results.md`` (title and the :func:`format_table` table) and ``results.png``
    (:func:`plot_accuracy`). Returns their paths under the keys ``json``, ``markdown`` and ``plot``.
    """
    if not results:
        raise ValueError("no results to report")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "results.png"}
    payload = {"title": title, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "results": {str(k): {m: finite(v) for m, v in metrics.items()} for k, metrics in results.items()}}
    if summary is not None:
        payload["summary"] = {k: finite(v) for k, v in summary.items()}
    atomic_write_text(paths["json"], json.dumps(payload, indent=2, default=json_default, allow_nan=False) + "\n")
    atomic_write_text(paths["markdown"], f"# {title}\n\n{format_table(results)}")
    buffer = io.BytesIO()
    plot_accuracy(results, buffer, title=title)
    atomic_write_bytes(paths["plot"], buffer.getvalue())
    return paths


def finite(value: Any) -> Any:
    """NaN and infinities as None, so ``results.json`` stays strict JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def json_default(value: Any) -> Any:
    """JSON for tensors, numpy scalars and paths that slip into a metrics dict."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def load_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """The ``{stage: metrics}`` dict of a ``results.json`` (or of the directory holding it); {} when missing.

    Lets a later stage add its row: ``results = load_results(d); results["dpo"] = m; write_report(results, d)``.
    """
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err.__class__.__name__}: {err}); move it away, or start a new "
                         "report (--append false)") from err
    rows = data.get("results") if isinstance(data, dict) and "title" in data else data
    if not isinstance(rows, dict) or not all(isinstance(v, dict) for v in rows.values()):
        raise ValueError(f"{path} does not hold a report ({{stage: metrics}}); move it away, or start a new report "
                         "(--append false)")
    return dict(rows)


# ----------------------------------------------------------------------------------------------------------------
# The demo: RL curves and what backtracking bought
# ----------------------------------------------------------------------------------------------------------------

RL_CURVES: tuple[str, ...] = ("rollout/accuracy", "rollout/backtrack_rate", "rollout/backtrack_precision")
"""The ``log_history.json`` keys :func:`plot_rl` draws, one panel each."""


def moving_mean(ys: Sequence[float], window: int = 10) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    return [sum(ys[max(0, k - window + 1) : k + 1]) / len(ys[max(0, k - window + 1) : k + 1]) for k in range(len(ys))]


def plot_rl(root: Path, path: Path, arms: Sequence[str] = ("ppo", "control_ppo")) -> Path | None:
    """Backtrack use and precision during RL (the ``arms``' rollouts, from ``root/<arm>/log_history.json``), and
    their accuracy; None (no file) when no arm has a log."""
    curves = {n: json.loads((root / n / "log_history.json").read_text()) for n in arms
              if (root / n / "log_history.json").exists()}
    if not curves:
        return None
    fig = _canvas((11, 3.4))
    for i, key in enumerate(RL_CURVES):
        ax = fig.add_subplot(1, 3, i + 1)
        for j, (name, rows) in enumerate(curves.items()):
            points = [(r["update"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, color=f"C{j}", alpha=0.25, linewidth=0.8)  # each update (64 answers): noisy
                ax.plot(xs, moving_mean(ys), color=f"C{j}", label=f"{name} (mean of 10)")
        ax.set_title(key.split("/")[1].replace("_", " "))
        ax.set_xlabel("PPO update")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return save_png(fig, path)


def run_environment() -> dict[str, Any]:
    """What a run's figures depend on beyond its config and seeds: the torch threads (a CPU matmul sums in an order
    that depends on them), the device and the library versions. With all of these the same, a rerun gives the same
    figures to the last digit."""
    import importlib.metadata as metadata

    import torch

    versions = {name: metadata.version(name) for name in ("torch", "transformers", "trl", "peft")}
    return {"threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available() else "cpu", **versions}


def reproducibility_line(env: Mapping[str, Any]) -> str:
    """One line saying when a rerun reproduces these figures exactly."""
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "transformers", "trl", "peft") if k in env)
    return (f"  bit-identical on rerun with {env['threads']} torch thread(s) on {env['device']} ({versions}); another "
            "thread count or device rounds differently (OMP_NUM_THREADS=1 matches the ablation's seeds)")


def summary_figures(results: Mapping[str, Mapping[str, Any]], *, task: str, semantics: str,
                    backtrack_stage: str = "ppo", control_stage: str = "control_ppo",
                    majority: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What backtracking bought, as figures (``results.json``'s ``summary``): the backtracking stage against the
    control stage (trained, and judged, without the action: its no-backtrack accuracies), and against the control's
    majority vote at equal tokens (``majority``: :func:`halluc_rl.evaluation.majority_vote` of the control, None
    when not run). Gains are the backtracking stage's accuracy minus the control's; the backtrack precision and
    false-backtrack rate are the backtracking stage's, sampled."""
    full, control = results[backtrack_stage], results[control_stage]

    def gain(a, b):
        return None if a is None or b is None else a - b

    return {
        "task": task, "semantics": semantics, "backtrack_stage": backtrack_stage, "control_stage": control_stage,
        "greedy_gain": gain(full["accuracy_greedy"], control["accuracy_greedy_no_backtrack"]),
        "sampled_gain": gain(full["accuracy_sampled"], control["accuracy_sampled_no_backtrack"]),
        "majority_gain": gain(full["accuracy_sampled"], (majority or {}).get("accuracy_majority")),
        "majority_k": (majority or {}).get("majority_k"),
        "backtrack_precision": full.get("sampled_backtrack_precision"),
        "false_backtrack_rate": full.get("sampled_false_backtrack_rate"),
    }


def demo_summary(results: Mapping[str, Mapping[str, Any]], env: Mapping[str, Any] | None = None,
                 majority: Mapping[str, Any] | None = None) -> str:
    """What backtracking bought: the full pipeline against plain SFT and against the no-backtrack control, and
    (given the run's :func:`run_environment`) when a rerun reproduces it exactly."""
    def num(value) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = ["What backtracking bought (held-out problems):"]
    full, plain, control = results.get("ppo"), results.get("plain_sft"), results.get("control_ppo")
    if full and plain and control:
        for mode in ("greedy", "sampled"):
            key = f"accuracy_{mode}"
            ctrl = control[f"{key}_no_backtrack"]  # the control is trained, and judged, without the action
            lines.append(f"  {mode:<7} {num(full[key])} (full pipeline) vs {num(plain[key])} (plain SFT, "
                         f"{full[key] - plain[key]:+.3f}) vs {num(ctrl)} (the same RL without backtracking, "
                         f"{full[key] - ctrl:+.3f})")
        if majority and majority.get("accuracy_majority") is not None:
            lines.append(f"  equal tokens: sampled {num(full['accuracy_sampled'])} vs {num(majority['accuracy_majority'])}"
                         f" (majority of {majority['majority_k']} answers of the control, "
                         f"{full['accuracy_sampled'] - majority['accuracy_majority']:+.3f})")
        lines.append(f"  sampled backtracks: rate {num(full['sampled_backtrack_rate'])}, precision "
                     f"{num(full['sampled_backtrack_precision'])}, false-backtrack rate "
                     f"{num(full['sampled_false_backtrack_rate'])}")
    if env is not None:
        lines.append(reproducibility_line(env))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The ablation: figures over seeds
# ----------------------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> str:
    """``mean ± std`` over seeds with 3 decimals (the mean alone for one value, '-' for none)."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def ablation_table(results: Mapping[str, list[dict]], differs: Mapping[str, str], figures: Sequence[str]) -> str:
    """Per row (in ``differs``' order): what differs from the default pipeline and each figure's
    :func:`mean_std` over the seeds that ran; a row names its failed seeds. No final newline."""
    lines = []
    for name, what in differs.items():
        done = [m for m in results[name] if "error" not in m]
        cells = [mean_std([m[k] for m in done if m.get(k) is not None]) for k in figures]
        failed = len(results[name]) - len(done)
        lines.append([f"{name}{f' ({failed} seed(s) failed)' if failed else ''}", what, *cells])
    return markdown_table(["row", "what differs", *figures], lines, numeric_from=2)


def plot_ablation(results: Mapping[str, list[dict]], path: Path) -> Path:
    """Per row, the mean greedy and sampled accuracy and the sampled accuracy with backtracking masked, with one
    standard deviation over seeds as error bars (rows that failed on every seed are left out)."""
    keys = {"accuracy_greedy": "greedy", "accuracy_sampled": "sampled (T=1)",
            "accuracy_sampled_no_backtrack": "sampled, backtracking masked"}
    names = [n for n, runs in results.items() if any("error" not in m for m in runs)]
    fig = _canvas((12, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(keys)
    for j, (key, label) in enumerate(keys.items()):
        values = [[m[key] for m in results[n] if "error" not in m and m.get(key) is not None] for n in names]
        means = [statistics.fmean(v) if v else 0.0 for v in values]
        errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]
        xs = [i + (j - (len(keys) - 1) / 2) * width for i in range(len(names))]
        ax.bar(xs, means, width=width, yerr=errs, capsize=2, label=label, color=f"C{j}",
               hatch="//" if "no_backtrack" in key else None, alpha=0.6 if "no_backtrack" in key else 1.0)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize="small")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (mean ± std over seeds)")
    ax.legend(fontsize="small", loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save_png(fig, path)


def plot_curves(curves: Mapping[str, Mapping[float, list[float]]], path: Path, xlabel: str, title: str = "",
                ylabel: str = "answer accuracy") -> Path:
    """One line per curve (``"<group>, <decoding>"``: a colour per group, solid for greedy, dashed for sampled),
    the mean over seeds at each x with one standard deviation as error bars; points with no value are left out."""
    groups = list(dict.fromkeys(label.split(",")[0] for label in curves))
    fig = _canvas((7, 4.4))
    ax = fig.add_subplot(1, 1, 1)
    for label, points in curves.items():
        xs = [x for x in sorted(points) if points[x]]
        ax.errorbar(xs, [statistics.fmean(points[x]) for x in xs], capsize=3, label=label,
                    yerr=[statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs],
                    fmt="--s" if "sampled" in label else "-o", color=f"C{groups.index(label.split(',')[0])}")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return save_png(fig, path)
