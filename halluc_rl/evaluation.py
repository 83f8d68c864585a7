"""Evaluating a policy: accuracy with and without backtracking, and how well it backtracks.

Three parts:

* :func:`backtrack_metrics` scores a generation trace against reference responses in token space: how often the
  policy backtracks, whether what it deletes was wrong, and how often it deletes a token that was right;
* :func:`evaluate_policy` runs a policy on problems greedily and sampled, each with backtracking on and off
  (``backtrack_bias=-inf``), and returns one flat metrics dict;
* the reports (:func:`write_report` turns ``{stage: metrics}`` into ``results.json``, a markdown table and a bar
  plot; :func:`print_table` shows the table in a terminal) live in :mod:`halluc_rl.reporting`, and are importable
  from here too.

A token is *correct* when the visible response up to and including it is a prefix of the reference response ids
(``encode_problem``'s response, EOS included). Once the text has left the reference, every later token counts as
wrong, even one that happens to equal the reference token at its position: the text is already off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from halluc_rl.backtrack import ActionKind, BacktrackState
from halluc_rl.data.deps import parse_question
from halluc_rl.data.deps_check import check_solution
from halluc_rl.data.grading import majority_reward, reward
from halluc_rl.data.tasks import Problem, encode_problem
from halluc_rl.distributed import all_sum
from halluc_rl.generation import BacktrackGenerationOutput, generate
from halluc_rl.policy import policy_backtrack, policy_semantics
from halluc_rl.reporting import (  # noqa: F401  (re-exported: the report's names were defined here first)
    ACCURACY_KEYS,
    REPORT_COLUMNS,
    SHORT_NAMES,
    format_table,
    load_results,
    plot_accuracy,
    print_table,
    write_report,
)
from halluc_rl.reporting import PLOT_LABELS as _PLOT_LABELS  # noqa: F401  (the old private names)
from halluc_rl.reporting import cell as _cell  # noqa: F401
from halluc_rl.reporting import finite as _finite  # noqa: F401
from halluc_rl.reporting import json_default as _json_default  # noqa: F401
from halluc_rl.reporting import stage_rows as _rows  # noqa: F401

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
    num_classified: int = 0
    """Precise deletions whose first mistake an oracle named (``deps``); the ``num_precise_*`` counts split them."""
    num_precise_premature_target: int = 0
    """... a premature line that names the asked-for variable: the trivially detectable case."""
    num_precise_premature: int = 0
    num_precise_unneeded: int = 0
    num_precise_repeat: int = 0
    num_precise_copy: int = 0
    num_precise_slip: int = 0
    num_precise_incomplete: int = 0
    num_precise_malformed: int = 0

    def __add__(self, other: BacktrackCounts) -> BacktrackCounts:
        return BacktrackCounts(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def all_sum(self, device: torch.device | str = "cpu") -> BacktrackCounts:
        """The counts summed over every process (:func:`halluc_rl.distributed.all_sum`; itself in one process)."""
        names = list(asdict(self))
        totals = all_sum(torch.tensor([float(getattr(self, k)) for k in names], dtype=torch.float64), device)
        return BacktrackCounts(**{k: int(v) for k, v in zip(names, totals.tolist())})

    def metrics(self) -> dict[str, float | int | None]:
        """The ratios (None where the denominator is zero: no deletions, no correct token, no episode)."""
        return {
            "backtrack_rate": ratio(self.num_backtracks, self.num_actions),
            "backtrack_precision": ratio(self.num_precise_deletions, self.num_deletions),
            "false_backtrack_rate": ratio(self.num_false_deletions, self.num_correct_appends),
            "failed_backtracks": ratio(self.num_failed, self.num_episodes),
            "num_deletions": self.num_deletions,
            **self.kind_metrics(),
        }

    def kind_metrics(self) -> dict[str, float | int | None]:
        """Where the precise deletions fell, by the kind of the first mistake in the text they cut
        (:data:`~halluc_rl.data.deps_check.ERROR_KINDS`, with the premature line naming the asked-for variable
        apart), and the precision without that trivially detectable case; no keys where no oracle named kinds."""
        if not self.num_classified:
            return {}
        kinds = {k[len("num_precise_"):]: v for k, v in asdict(self).items() if k.startswith("num_precise_")
                 and k != "num_precise_deletions"}
        trivial = self.num_precise_premature_target
        return {"backtrack_precision_nontrivial": ratio(self.num_precise_deletions - trivial,
                                                        self.num_deletions - trivial),
                **{f"precise_deletions_{k}": v for k, v in kinds.items()}}


def ratio(num: float, den: float) -> float | None:
    """``num / den``, or None when there is nothing to divide by (a rate of no events)."""
    return num / den if den else None


def _trace_backtrack_id(out: BacktrackGenerationOutput) -> int:
    """The backtrack id, read off the trace (the action of any DELETE/FAILED step); -1 when none was taken."""
    bt_actions = out.actions[out.kinds >= int(ActionKind.DELETE)]  # [n_backtracks]
    if bt_actions.numel() == 0:
        return -1  # never equals an action of an active step
    if bool((bt_actions != bt_actions[0]).any()):
        raise ValueError("the trace's backtrack actions use more than one token id")
    return int(bt_actions[0])


class OracleJudge:
    """Judges a ``deps`` problem's visible response ids: on track or not (calling it: the oracle reward's own rule,
    :meth:`~halluc_rl.rewards.OracleProcessReward.on_track`), and the kind of their first mistake."""

    def __init__(self, tokenizer, question: str) -> None:
        from halluc_rl.rewards import OracleProcessReward

        self.oracle, self.tokenizer, self.question = OracleProcessReward(tokenizer), tokenizer, question
        self.parsed, self.special = parse_question(question), set(tokenizer.all_special_ids)

    def _text(self, ids: list[int]) -> tuple[str, bool]:
        return self.tokenizer.decode(ids, skip_special_tokens=True), bool(ids) and ids[-1] in self.special

    def __call__(self, ids: list[int]) -> bool:
        text, ended = self._text(ids)
        return self.oracle.on_track(text, "", ended, self.question)

    def mistake(self, ids: list[int]) -> str | None:
        """The kind of the first mistake in ``ids`` (``premature_target``: a premature line naming the asked-for
        variable, which a model can tell from the question alone); None when they are on track."""
        text, ended = self._text(ids)
        verdict = check_solution(self.parsed, text, ended)
        if verdict.on_track:
            return None
        named_target = verdict.char is not None and text[verdict.char : verdict.char + 1] == self.parsed.target
        return "premature_target" if verdict.kind == "premature" and named_target else verdict.kind


def oracle_judges(tokenizer, problems: Sequence[Problem]) -> list[OracleJudge | None]:
    """Per problem, an :class:`OracleJudge` where its task has a checker that accepts more than the reference
    (``deps``: every valid order), else None (the reference prefix decides)."""
    return [None if parse_question(p.question) is None else OracleJudge(tokenizer, p.question) for p in problems]


def backtrack_counts(out: BacktrackGenerationOutput, references: Sequence[Sequence[int]],
                     judges: Sequence[Callable[[list[int]], bool] | None] | None = None) -> BacktrackCounts:
    """Replay each row's trace with :class:`~halluc_rl.backtrack.BacktrackState` and count against ``references``.

    ``references[b]`` is row ``b``'s reference response ids (EOS included, as :func:`encode_problem` gives them).
    ``judges[b]`` (:func:`oracle_judges`), where given, decides instead whether the visible ids are still right (a
    token after a wrong one stays wrong either way). The replay is checked against the trace (kinds and deleted
    tokens) and the final visible ids.
    """
    batch = out.kinds.shape[0]
    if len(references) != batch:
        raise ValueError(f"{len(references)} references for {batch} generated rows")
    bt = _trace_backtrack_id(out)
    kinds, actions, deleted = out.kinds.tolist(), out.actions.tolist(), out.deleted.tolist()  # [B][S] each
    counts = BacktrackCounts(num_episodes=batch)
    for b in range(batch):
        ref = list(references[b])
        judge = judges[b] if judges is not None else None
        state = BacktrackState(bt)
        on_ref: list[bool] = []  # on_ref[i]: visible[: i + 1] is a prefix of ref (a stack parallel to visible)
        for kind, action, gone in zip(kinds[b], actions[b], deleted[b]):
            if kind < 0:
                break
            pos = len(state)
            before = state.visible_ids if action == bt and hasattr(judge, "mistake") else None
            outcome = state.push(action)
            if int(outcome.kind) != kind or (outcome.deleted if outcome.deleted is not None else -1) != gone:
                raise ValueError(f"row {b}: the trace disagrees with the backtrack semantics at response index {pos}")
            counts.num_actions += 1
            if outcome.kind == ActionKind.APPEND:
                if judge is None:
                    ok = (not on_ref or on_ref[-1]) and pos < len(ref) and ref[pos] == action
                else:
                    ok = (not on_ref or on_ref[-1]) and judge(state.visible_ids)
                on_ref.append(ok)
                counts.num_correct_appends += ok
            elif outcome.kind == ActionKind.DELETE:
                counts.num_backtracks += 1
                counts.num_deletions += 1
                if on_ref.pop():
                    counts.num_false_deletions += 1
                else:
                    counts.num_precise_deletions += 1
                    kind = judge.mistake(before) if before is not None else None
                    if kind is not None:
                        counts.num_classified += 1
                        setattr(counts, f"num_precise_{kind}", getattr(counts, f"num_precise_{kind}") + 1)
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
    * ``num_deletions`` - deletions in total;
    * on ``deps`` (an oracle judges the text), ``precise_deletions_<kind>`` - the precise deletions by the kind of
      the first mistake in the text they cut (``premature_target``: a premature line naming the asked-for variable,
      kept apart from ``premature``), and ``backtrack_precision_nontrivial`` - the precision without those; absent
      where no precise deletion was judged by an oracle.

    Raw counts are in :func:`backtrack_counts`; sum those to pool several batches.
    """
    return backtrack_counts(out, references).metrics()


# ----------------------------------------------------------------------------------------------------------------
# Policy evaluation
# ----------------------------------------------------------------------------------------------------------------

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
         judges: list | None = None, **options) -> _RunTotals:
    """Generate for every prompt in batches of ``batch_size`` and accumulate grades, lengths and trace counts
    (``judges``: :func:`oracle_judges` of the prompts' problems)."""
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
        totals.counts += backtrack_counts(out, references[i : i + batch_size],
                                          None if judges is None else judges[i : i + batch_size])
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
    majority: int = 0,
) -> dict[str, Any]:
    """Score a policy on ``problems``: greedy and sampled, each with backtracking on and off.

    Keys (``None`` where a ratio has no denominator):

    * ``accuracy_greedy``, ``accuracy_sampled`` (mean over ``num_samples`` samples per problem at ``temperature``),
      ``accuracy_greedy_no_backtrack``, ``accuracy_sampled_no_backtrack`` (the same policy with the backtrack
      token masked, ``backtrack_bias=-inf``);
    * the :func:`backtrack_metrics` of the greedy run under their own names (``backtrack_rate``,
      ``backtrack_precision``, ``false_backtrack_rate``, ``failed_backtracks``, ``num_deletions``, and on ``deps``
      the precise deletions by error kind and ``backtrack_precision_nontrivial``) and of the sampled run prefixed
      ``sampled_``;
    * ``reference_nll`` - the mean negative log-likelihood per token of the reference solutions (EOS included),
      teacher-forced through the action-stream scorer with the policy's head (how sure the policy is of clean text);
    * ``tokens_per_solved`` - greedy actions spent in total (backtracks included) / problems solved greedily;
      ``mean_actions`` - greedy actions per problem (``sampled_mean_actions``: per sampled answer);
      ``truncated_rate`` - share of greedy episodes that ran out
      of ``max_new_tokens`` before EOS or a stop string;
    * ``accuracy_majority`` (maj@k: the share of problems whose ``majority`` sampled answers, backtracking on,
      vote for the right number; self-consistency, Wang et al. 2023) and ``majority_actions_per_problem`` (the
      actions those k samples spent per problem, to compare arms at equal tokens); None when ``majority`` is 0;
    * ``num_problems``, ``num_samples``, and ``semantics``: what a backspace left in the policy's context in these
      runs (the one recorded on ``model.config``, :func:`halluc_rl.policy.policy_semantics`).

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
    encoded = [encode_problem(p, tokenizer) for p in problems]
    prompts = [prompt for prompt, _ in encoded]
    references = [response for _, response in encoded]
    golds = [p.answer for p in problems]
    judges = oracle_judges(tokenizer, problems)
    runs = _decode_runs(model, tokenizer, prompts, references, golds, num_samples=num_samples,
                        judges=None if all(j is None for j in judges) else judges,
                        temperature=temperature, seed=seed, loop_guard=loop_guard,
                        sampled_loop_guard=sampled_loop_guard, backtrack_bias=backtrack_bias, progress=progress,
                        batch_size=batch_size, backtrack_id=bt, max_new_tokens=max_new_tokens,
                        stop_strings=tuple(stop_strings), backtrack_budget=backtrack_budget)
    nll = reference_nll(model, prompts, references, batch_size=batch_size, backtrack_id=bt)
    votes = majority_vote(model, tokenizer, prompts, golds, majority, temperature=temperature, seed=seed,
                          batch_size=batch_size, backtrack_id=bt, max_new_tokens=max_new_tokens,
                          stop_strings=tuple(stop_strings), backtrack_bias=backtrack_bias,
                          backtrack_budget=backtrack_budget, loop_guard=sampled_loop_guard or None)
    return {**_summarise(*runs, reference_nll=nll, num_samples=num_samples), **votes,
            "semantics": policy_semantics(model)}


def majority_vote(model, tokenizer, prompts: list[list[int]], golds: list[str], k: int, *, temperature: float,
                  seed: int, batch_size: int, **options) -> dict[str, float | int | None]:
    """maj@k: ``k`` sampled answers per problem (one generator seeded with ``seed``), graded by their majority
    answer (:func:`halluc_rl.data.grading.majority_reward`). Returns ``accuracy_majority``, ``majority_k`` and
    ``majority_actions_per_problem`` (None for ``k`` 0)."""
    if k <= 0:
        return {"accuracy_majority": None, "majority_k": 0, "majority_actions_per_problem": None}
    generator = _generator(next(model.parameters()).device, seed + 1)  # another stream than the sampled runs'
    rows = [i for i in range(len(prompts)) for _ in range(k)]  # each problem k times, side by side
    texts, actions = [], 0
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        out = generate(model, tokenizer, [prompts[i] for i in batch], do_sample=True, temperature=temperature,
                       generator=generator, **options)
        texts += out.texts
        actions += int(out.action_mask.sum())
    correct = sum(majority_reward(texts[i * k : (i + 1) * k], gold) for i, gold in enumerate(golds))
    return {"accuracy_majority": correct / len(golds), "majority_k": k,
            "majority_actions_per_problem": actions / len(golds)}


def _decode_runs(model, tokenizer, prompts: list[list[int]], references: list[list[int]], golds: list[str], *,
                 num_samples: int, temperature: float, seed: int, loop_guard: int | None,
                 sampled_loop_guard: int | None, backtrack_bias: float, progress: bool, judges: list | None = None,
                 **common
                 ) -> tuple[_RunTotals, _RunTotals, _RunTotals | None, _RunTotals | None]:
    """:func:`evaluate_policy`'s four runs: greedy, greedy with the backtrack masked, then (``num_samples`` > 0)
    the same two sampled, ``num_samples`` answers per problem, each from a generator seeded with ``seed``.
    ``common`` (batch size, backtrack id, length, stop strings, budget) goes to every run."""
    device = next(model.parameters()).device
    on, no_bt = dict(backtrack_bias=backtrack_bias), dict(backtrack_bias=float("-inf"))
    n = len(prompts)
    bar = tqdm(total=2 * n * (1 + num_samples), disable=not progress, unit="ep", dynamic_ncols=True)
    greedy_kw = dict(do_sample=False, loop_guard=loop_guard or None, bar=bar, **common)
    greedy = _run(model, tokenizer, prompts, references, golds, desc="greedy", generator=None, judges=judges, **on,
                  **greedy_kw)
    greedy_nb = _run(model, tokenizer, prompts, references, golds, desc="greedy, no backtrack", generator=None,
                     judges=judges, **no_bt, **greedy_kw)
    sampled = sampled_nb = None
    if num_samples:
        rep = [i for i in range(n) for _ in range(num_samples)]  # each problem num_samples times, side by side
        args = ([prompts[i] for i in rep], [references[i] for i in rep], [golds[i] for i in rep])
        sampling = dict(do_sample=True, temperature=temperature, loop_guard=sampled_loop_guard or None, bar=bar,
                        **common)
        sampling["judges"] = None if judges is None else [judges[i] for i in rep]
        sampled = _run(model, tokenizer, *args, desc="sampled", generator=_generator(device, seed), **on,
                       **sampling)
        sampled_nb = _run(model, tokenizer, *args, desc="sampled, no backtrack", generator=_generator(device, seed),
                          **no_bt, **sampling)
    bar.close()
    return greedy, greedy_nb, sampled, sampled_nb


def _summarise(greedy: _RunTotals, greedy_nb: _RunTotals, sampled: _RunTotals | None,
               sampled_nb: _RunTotals | None, *, reference_nll: float, num_samples: int) -> dict[str, Any]:
    """The four runs' totals as :func:`evaluate_policy`'s flat metrics dict (its keys, in their order)."""
    n = greedy.episodes
    results: dict[str, Any] = {
        "accuracy_greedy": greedy.correct / n,
        "accuracy_sampled": sampled.correct / sampled.episodes if sampled else None,
        "accuracy_greedy_no_backtrack": greedy_nb.correct / n,
        "accuracy_sampled_no_backtrack": sampled_nb.correct / sampled_nb.episodes if sampled_nb else None,
    }
    results.update(greedy.counts.metrics())
    sampled_metrics = sampled.counts.metrics() if sampled else dict.fromkeys(BacktrackCounts().metrics())
    results.update({f"sampled_{k}": v for k, v in sampled_metrics.items()})
    results["reference_nll"] = reference_nll
    results["tokens_per_solved"] = greedy.actions / greedy.correct if greedy.correct else None
    results["mean_actions"] = greedy.actions / n
    results["sampled_mean_actions"] = sampled.actions / sampled.episodes if sampled else None
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
