"""Evaluating a policy: accuracy with and without backtracking, and how well it backtracks.

Three parts:

* :func:`backtrack_metrics` scores a generation trace against reference responses in token space: how often the
  policy backtracks, whether what it deletes was wrong, and how often it deletes a token that was right;
* :func:`evaluate_policy` runs a policy on problems greedily and sampled, each with backtracking on and off
  (``backtrack_bias=-inf``), and returns one flat metrics dict;
* :func:`write_report` turns ``{stage: metrics}`` (base, plain SFT, backtrack SFT, later DPO/PPO...) into
  ``results.json``, a markdown table and a bar plot; :func:`print_table` shows the table in a terminal.

A token is *correct* when the visible response up to and including it is a prefix of the reference response ids
(``encode_problem``'s response, EOS included). Once the text has left the reference, every later token counts as
wrong, even one that happens to equal the reference token at its position: the text is already off.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from halluc_rl.backtrack import ActionKind, BacktrackState
from halluc_rl.data.grading import reward
from halluc_rl.data.tasks import Problem, encode_problem
from halluc_rl.generation import BacktrackGenerationOutput, generate
from halluc_rl.policy import policy_backtrack

# ----------------------------------------------------------------------------------------------------------------
# Backtrack metrics from a trace
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class BacktrackCounts:
    """Raw counts behind :func:`backtrack_metrics`; add them up over batches, then call :meth:`metrics`.

    Ratios are taken over the pooled counts (every action of every episode weighs the same), so evaluating in
    batches of any size gives the same numbers.
    """

    num_episodes: int = 0
    num_actions: int = 0
    """Actions taken (appends, deletions and failed backtracks)."""
    num_backtracks: int = 0
    """Backtrack actions: deletions plus failed backtracks."""
    num_deletions: int = 0
    num_failed: int = 0
    """Backtracks on an empty response (no-ops)."""
    num_precise_deletions: int = 0
    """Deletions of a token after which the visible response was off the reference."""
    num_false_deletions: int = 0
    """Deletions of a token after which the visible response was still a prefix of the reference."""
    num_correct_appends: int = 0
    """Appends after which the visible response was a prefix of the reference."""

    def __add__(self, other: BacktrackCounts) -> BacktrackCounts:
        return BacktrackCounts(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def metrics(self) -> dict[str, float | int | None]:
        """The ratios (None where the denominator is zero: no deletions, no correct token, no episode)."""
        return {
            "backtrack_rate": _ratio(self.num_backtracks, self.num_actions),
            "backtrack_precision": _ratio(self.num_precise_deletions, self.num_deletions),
            "false_backtrack_rate": _ratio(self.num_false_deletions, self.num_correct_appends),
            "failed_backtracks": _ratio(self.num_failed, self.num_episodes),
            "num_deletions": self.num_deletions,
        }


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _trace_backtrack_id(out: BacktrackGenerationOutput) -> int:
    """The backtrack id, read off the trace (the action of any DELETE/FAILED step); -1 when none was taken."""
    bt_actions = out.actions[out.kinds >= int(ActionKind.DELETE)]  # [n_backtracks]
    if bt_actions.numel() == 0:
        return -1  # never equals an action of an active step
    if bool((bt_actions != bt_actions[0]).any()):
        raise ValueError("the trace's backtrack actions use more than one token id")
    return int(bt_actions[0])


def backtrack_counts(out: BacktrackGenerationOutput, references: Sequence[Sequence[int]]) -> BacktrackCounts:
    """Replay each row's trace with :class:`~halluc_rl.backtrack.BacktrackState` and count against ``references``.

    ``references[b]`` is row ``b``'s reference response ids (EOS included, as :func:`encode_problem` gives them).
    The replay is checked against the trace (kinds and deleted tokens) and the final visible ids.
    """
    batch = out.kinds.shape[0]
    if len(references) != batch:
        raise ValueError(f"{len(references)} references for {batch} generated rows")
    bt = _trace_backtrack_id(out)
    kinds, actions, deleted = out.kinds.tolist(), out.actions.tolist(), out.deleted.tolist()  # [B][S] each
    counts = BacktrackCounts(num_episodes=batch)
    for b in range(batch):
        ref = list(references[b])
        state = BacktrackState(bt)
        on_ref: list[bool] = []  # on_ref[i]: visible[: i + 1] is a prefix of ref (a stack parallel to visible)
        for kind, action, gone in zip(kinds[b], actions[b], deleted[b]):
            if kind < 0:
                break
            pos = len(state)
            outcome = state.push(action)
            if int(outcome.kind) != kind or (outcome.deleted if outcome.deleted is not None else -1) != gone:
                raise ValueError(f"row {b}: the trace disagrees with the backtrack semantics at response index {pos}")
            counts.num_actions += 1
            if outcome.kind == ActionKind.APPEND:
                ok = (not on_ref or on_ref[-1]) and pos < len(ref) and ref[pos] == action
                on_ref.append(ok)
                counts.num_correct_appends += ok
            elif outcome.kind == ActionKind.DELETE:
                counts.num_backtracks += 1
                counts.num_deletions += 1
                if on_ref.pop():
                    counts.num_false_deletions += 1
                else:
                    counts.num_precise_deletions += 1
            else:
                counts.num_backtracks += 1
                counts.num_failed += 1
        if out.sequences and state.visible_ids != list(out.sequences[b]):
            raise ValueError(f"row {b}: replaying the trace does not give the visible sequence")
    return counts


def backtrack_metrics(out: BacktrackGenerationOutput, references: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Backtrack quality of one generation batch, in token space.

    * ``backtrack_rate`` - backtrack actions (deletions and failed backtracks) / all actions;
    * ``backtrack_precision`` - share of deletions whose deleted token was wrong: the visible response up to and
      including it was not a prefix of the reference (None without deletions);
    * ``false_backtrack_rate`` - deletions of a correct token / appends of a correct token: the chance that a
      token on the reference gets deleted (None when no correct token was appended);
    * ``failed_backtracks`` - backtracks on an empty response, mean per episode;
    * ``num_deletions`` - deletions in total.

    Raw counts are in :func:`backtrack_counts`; sum those to pool several batches.
    """
    return backtrack_counts(out, references).metrics()


# ----------------------------------------------------------------------------------------------------------------
# Policy evaluation
# ----------------------------------------------------------------------------------------------------------------

ACCURACY_KEYS: tuple[str, ...] = (
    "accuracy_greedy", "accuracy_sampled", "accuracy_greedy_no_backtrack", "accuracy_sampled_no_backtrack",
)
"""The four accuracies :func:`evaluate_policy` reports (and the report plots)."""


@dataclass
class _RunTotals:
    """What one decoding mode accumulates over its batches."""

    correct: float = 0.0
    episodes: int = 0
    actions: int = 0
    solved_actions: int = 0
    truncated: int = 0
    counts: BacktrackCounts = field(default_factory=BacktrackCounts)


def _run(model, tokenizer, prompts: list[list[int]], references: list[list[int]], golds: list[str], *,
         batch_size: int, bar: tqdm, desc: str, backtrack_id: int, generator: torch.Generator | None,
         **options) -> _RunTotals:
    """Generate for every prompt in batches of ``batch_size`` and accumulate grades, lengths and trace counts."""
    totals = _RunTotals()
    bar.set_description(desc)
    for i in range(0, len(prompts), batch_size):
        out = generate(model, tokenizer, prompts[i : i + batch_size], backtrack_id=backtrack_id,
                       generator=generator, **options)
        grades = [reward(text, gold) for text, gold in zip(out.texts, golds[i : i + batch_size])]
        actions = out.action_mask.sum(1).tolist()  # [B] actions per episode
        totals.correct += sum(grades)
        totals.episodes += len(grades)
        totals.actions += sum(actions)
        totals.solved_actions += sum(n for n, g in zip(actions, grades) if g > 0)
        totals.truncated += int((~out.finished).sum())
        totals.counts += backtrack_counts(out, references[i : i + batch_size])
        bar.update(len(grades))
    return totals


def evaluate_policy(
    model,
    tokenizer,
    problems: Sequence[Problem],
    *,
    num_samples: int = 4,
    temperature: float = 1.0,
    max_new_tokens: int = 128,
    batch_size: int = 64,
    loop_guard: int | None = 1,
    sampled_loop_guard: int | None = None,
    seed: int = 0,
    stop_strings: Sequence[str] = (),
    backtrack_id: int | None = None,
    progress: bool = True,
    backtrack_bias: float = 0.0,
    backtrack_budget: int | None = None,
) -> dict[str, Any]:
    """Score a policy on ``problems``: greedy and sampled, each with backtracking on and off.

    Keys (``None`` where a ratio has no denominator):

    * ``accuracy_greedy``, ``accuracy_sampled`` (mean over ``num_samples`` samples per problem at ``temperature``),
      ``accuracy_greedy_no_backtrack``, ``accuracy_sampled_no_backtrack`` (the same policy with the backtrack
      token masked, ``backtrack_bias=-inf``);
    * the :func:`backtrack_metrics` of the greedy run under their own names (``backtrack_rate``,
      ``backtrack_precision``, ``false_backtrack_rate``, ``failed_backtracks``, ``num_deletions``) and of the
      sampled run prefixed ``sampled_``;
    * ``reference_nll`` - the mean negative log-likelihood per token of the reference solutions (EOS included),
      teacher-forced through the action-stream scorer with the policy's head (how sure the policy is of clean text);
    * ``tokens_per_solved`` - greedy actions spent in total (backtracks included) / problems solved greedily;
      ``mean_actions`` - greedy actions per problem; ``truncated_rate`` - share of greedy episodes that ran out
      of ``max_new_tokens`` before EOS or a stop string;
    * ``num_problems``, ``num_samples``.

    ``num_samples=0`` skips the sampled runs (their keys are None). ``loop_guard`` (greedy runs) and
    ``sampled_loop_guard`` (sampled runs; off by default) ban a token at a position after that many deletions there;
    0 or None is off. The guard is for greedy decoding, which repeats its choice at a state it returns to; a sampled
    policy simply draws again, and a ban after a false deletion would forbid the right token (measured in
    docs/demo.md). ``backtrack_bias`` (added to the backtrack logit) and ``backtrack_budget`` (backtracks allowed
    per episode) apply to the runs with backtracking on: the decoding knobs of ``BacktrackGenerationConfig``.
    Sampling draws from a ``torch.Generator`` seeded with ``seed`` (one per sampled run), so results repeat.
    """
    if not problems:
        raise ValueError("no problems to evaluate")
    if num_samples < 0 or batch_size < 1 or max_new_tokens < 1:
        raise ValueError("need num_samples >= 0, batch_size >= 1 and max_new_tokens >= 1")
    bt, _ = policy_backtrack(model, backtrack_id)
    device = next(model.parameters()).device
    encoded = [encode_problem(p, tokenizer) for p in problems]
    prompts = [prompt for prompt, _ in encoded]
    references = [response for _, response in encoded]
    golds = [p.answer for p in problems]
    common = dict(max_new_tokens=max_new_tokens, stop_strings=tuple(stop_strings), backtrack_budget=backtrack_budget)
    on, no_bt = dict(backtrack_bias=backtrack_bias), dict(backtrack_bias=float("-inf"))

    n = len(problems)
    bar = tqdm(total=2 * n * (1 + num_samples), disable=not progress, unit="ep", dynamic_ncols=True)
    kw = dict(batch_size=batch_size, bar=bar, backtrack_id=bt)
    greedy_kw = dict(do_sample=False, loop_guard=loop_guard or None, **kw, **common)
    greedy = _run(model, tokenizer, prompts, references, golds, desc="greedy", generator=None, **on, **greedy_kw)
    greedy_nb = _run(model, tokenizer, prompts, references, golds, desc="greedy, no backtrack", generator=None,
                     **no_bt, **greedy_kw)
    sampled = sampled_nb = None
    if num_samples:
        rep = [i for i in range(n) for _ in range(num_samples)]  # each problem num_samples times, side by side
        args = ([prompts[i] for i in rep], [references[i] for i in rep], [golds[i] for i in rep])
        sampling = dict(do_sample=True, temperature=temperature, loop_guard=sampled_loop_guard or None, **kw, **common)
        sampled = _run(model, tokenizer, *args, desc="sampled", generator=_generator(device, seed), **on,
                       **sampling)
        sampled_nb = _run(model, tokenizer, *args, desc="sampled, no backtrack", generator=_generator(device, seed),
                          **no_bt, **sampling)
    bar.close()

    results: dict[str, Any] = {
        "accuracy_greedy": greedy.correct / n,
        "accuracy_sampled": sampled.correct / sampled.episodes if sampled else None,
        "accuracy_greedy_no_backtrack": greedy_nb.correct / n,
        "accuracy_sampled_no_backtrack": sampled_nb.correct / sampled_nb.episodes if sampled_nb else None,
    }
    results.update(greedy.counts.metrics())
    sampled_metrics = sampled.counts.metrics() if sampled else dict.fromkeys(BacktrackCounts().metrics())
    results.update({f"sampled_{k}": v for k, v in sampled_metrics.items()})
    results["reference_nll"] = reference_nll(model, prompts, references, batch_size=batch_size, backtrack_id=bt)
    results["tokens_per_solved"] = greedy.actions / greedy.correct if greedy.correct else None
    results["mean_actions"] = greedy.actions / n
    results["truncated_rate"] = greedy.truncated / n
    results["num_problems"] = n
    results["num_samples"] = num_samples
    return results


@torch.no_grad()
def reference_nll(model, prompts: Sequence[Sequence[int]], references: Sequence[Sequence[int]], *,
                  batch_size: int = 64, backtrack_id: int | None = None) -> float:
    """Mean NLL per reference token under the policy's decoding distribution (greedy rules, temperature 1)."""
    from halluc_rl.scoring import score_actions

    total, count = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        refs = references[i : i + batch_size]
        actions = torch.full((len(refs), max(map(len, refs))), -1, dtype=torch.long)  # [B, S]
        for b, ref in enumerate(refs):
            actions[b, : len(ref)] = torch.tensor(ref)
        scores = score_actions(model, prompts[i : i + batch_size], actions, backtrack_id=backtrack_id)
        total -= float(scores.logprobs.sum())
        count += int(scores.mask.sum())
    return total / count


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# Reports
# ----------------------------------------------------------------------------------------------------------------

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

_PLOT_LABELS: dict[str, str] = {
    "accuracy_greedy": "greedy", "accuracy_greedy_no_backtrack": "greedy, no backtrack",
    "accuracy_sampled": "sampled", "accuracy_sampled_no_backtrack": "sampled, no backtrack",
}


def _cell(key: str, value: Any) -> str:
    """One table cell: accuracies and rates with 3 decimals, token counts with 1, missing values as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if key == "tokens_per_solved":
        return f"{float(value):.1f}"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _rows(results: Mapping[str, Mapping[str, Any]], columns: Sequence[str]) -> list[list[str]]:
    return [[str(stage), *(_cell(c, metrics.get(c)) for c in columns)] for stage, metrics in results.items()]


def format_table(results: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = REPORT_COLUMNS) -> str:
    """A markdown table: one row per stage (in the dict's order), one column per metric."""
    lines = ["| " + " | ".join(["stage", *columns]) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(results, columns)]
    return "\n".join(lines) + "\n"


def print_table(results: Mapping[str, Mapping[str, Any]], title: str = "halluc-rl evaluation",
                columns: Sequence[str] = REPORT_COLUMNS) -> None:
    """Print the report table to stdout: a ``rich`` table when rich is installed, else the markdown text."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(f"{title}\n\n{format_table(results, columns)}")
        return
    table = Table(title=title)
    table.add_column("stage", no_wrap=True)
    for c in columns:
        table.add_column(SHORT_NAMES.get(c, c), justify="right")
    for row in _rows(results, columns):
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a log file or a pipe: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)


def plot_accuracy(results: Mapping[str, Mapping[str, Any]], path: str | Path | io.BytesIO,
                  title: str = "halluc-rl evaluation") -> str | Path | io.BytesIO:
    """A grouped bar plot (PNG, Agg backend): per stage, greedy and sampled accuracy with and without backtracking.

    Missing values are left out (no bar); the pyplot state and the global backend are not touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stages = list(results)
    keys = list(_PLOT_LABELS)
    width = 0.8 / len(keys)
    fig = Figure(figsize=(max(6.0, 1.6 * len(stages) + 2), 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for j, key in enumerate(keys):
        xs, ys = [], []
        for i, stage in enumerate(stages):
            value = results[stage].get(key)
            if value is not None and not math.isnan(float(value)):
                xs.append(i + (j - (len(keys) - 1) / 2) * width)
                ys.append(float(value))
        ax.bar(xs, ys, width=width, label=_PLOT_LABELS[key], hatch="//" if "no_backtrack" in key else None,
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
                 title: str = "halluc-rl evaluation") -> dict[str, Path]:
    """Write ``results`` (stage name -> metrics dict, any number of stages) to ``out_dir``.

    Files: ``results.json`` (``{"title", "created", "results"}`` with ``results`` as given; read it back with
    :func:`load_results`), ``results.md`` (title and the :func:`format_table` table) and ``results.png``
    (:func:`plot_accuracy`). Returns their paths under the keys ``json``, ``markdown`` and ``plot``.
    """
    if not results:
        raise ValueError("no results to report")
    from halluc_rl.atomic import atomic_write_bytes, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "results.png"}
    payload = {"title": title, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "results": {str(k): {m: _finite(v) for m, v in metrics.items()} for k, metrics in results.items()}}
    atomic_write_text(paths["json"], json.dumps(payload, indent=2, default=_json_default, allow_nan=False) + "\n")
    atomic_write_text(paths["markdown"], f"# {title}\n\n{format_table(results)}")
    buffer = io.BytesIO()
    plot_accuracy(results, buffer, title=title)
    atomic_write_bytes(paths["plot"], buffer.getvalue())
    return paths


def _finite(value: Any) -> Any:
    """NaN and infinities as None, so ``results.json`` stays strict JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _json_default(value: Any) -> Any:
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
