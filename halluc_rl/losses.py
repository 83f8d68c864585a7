"""Losses and the action distributions they imply: one home for the maths trainers and generation share.

Three readings of the backtrack logit ``z`` (the ``backtrack_head`` of a policy):

* ``softmax`` (the default): ``<|BACKTRACK|>`` is one more token of the vocabulary softmax, trained with the usual
  next-token cross-entropy.
* ``factorized``: a separate "delete?" decision. P(backtrack | s) = sigmoid(z) and
  P(token | s) = (1 - sigmoid(z)) * softmax(other logits). It is trained with binary cross-entropy on ``z`` at every
  labelled state, and next-token cross-entropy over the other logits only where the label is a token. A backtrack
  label then never pushes the vocabulary's logits down, which on the embedded tiny model removes the loss of
  confidence that softmax training causes on clean text (measured in docs/demo.md).
* ``calibrated``: the factorized head on the shifted logit ``z - sg(logsumexp(others))`` (``sg``: stop-gradient).
  In value it is the softmax head exactly (sigmoid(z - lse) = e^z / (e^z + sum e^others)), so a fresh backtrack
  token starts as unlikely as under the softmax. In its gradients it is the factorized head: a backtrack label moves
  ``z`` only, never the vocabulary's logits. A real model's raw ``z`` is large (SmolLM2 starts the factorized head
  at P(backtrack) 0.77 on average, ``benchmarks/head_init.py``), which the calibrated head does not inherit.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

BACKTRACK_HEADS: tuple[str, ...] = ("softmax", "factorized", "calibrated")
IGNORE_INDEX = -100


def check_head(head: str) -> str:
    if head not in BACKTRACK_HEADS:
        raise ValueError(f"backtrack_head must be one of {BACKTRACK_HEADS}, got {head!r}")
    return head


def factorized_log_probs(logits: torch.Tensor, backtrack_id: int, calibrated: bool = False) -> torch.Tensor:
    """Log-probabilities [..., V] of the factorised action distribution from raw logits [..., V].

    log P(bt) = logsigmoid(z); log P(tok) = logsigmoid(-z) + log_softmax(others)(tok). ``calibrated`` shifts ``z`` by
    the stop-gradient log-sum-exp of the other logits (the ``calibrated`` head).
    """
    logits = logits.float()
    z = logits[..., backtrack_id]  # [...]
    others = logits.clone()
    others[..., backtrack_id] = float("-inf")
    if calibrated:
        z = z - torch.logsumexp(others.detach(), dim=-1)  # [...]
    out = torch.log_softmax(others, dim=-1) + F.logsigmoid(-z).unsqueeze(-1)  # [..., V]
    out[..., backtrack_id] = F.logsigmoid(z)
    return out


def action_log_probs(logits: torch.Tensor, backtrack_id: int, head: str = "softmax") -> torch.Tensor:
    """Log-probabilities [..., V] of every action under ``head`` (what generation samples from)."""
    if check_head(head) != "softmax":
        return factorized_log_probs(logits, backtrack_id, calibrated=head == "calibrated")
    return torch.log_softmax(logits.float(), dim=-1)


def factorized_backtrack_loss(logits: torch.Tensor, labels: torch.Tensor, backtrack_id: int,
                              num_items: int | torch.Tensor | None = None, calibrated: bool = False) -> torch.Tensor:
    """Summed BCE on the backtrack logit plus token cross-entropy, divided by the number of labels.

    ``logits`` [B, L, V] and ``labels`` [B, L] are in the Hugging Face layout (``labels[:, i + 1]`` is the target of
    ``logits[:, i]``; ``-100`` is ignored). ``num_items`` overrides the divisor (gradient accumulation).
    ``calibrated``: the BCE is on ``z - sg(logsumexp(others))`` (the ``calibrated`` head).
    """
    logits = logits[:, :-1].float()  # [B, L-1, V]
    labels = labels[:, 1:]  # [B, L-1]
    valid = labels != IGNORE_INDEX
    target = labels[valid]  # [N]
    is_bt = target == backtrack_id  # [N]
    z = logits[..., backtrack_id][valid]  # [N]
    rest = logits[valid]  # [N, V] (a copy)
    rest[:, backtrack_id] = float("-inf")
    lse = torch.logsumexp(rest, dim=-1)  # [N]: the normaliser of the token distribution
    if calibrated:
        z = z - lse.detach()
    bce = F.binary_cross_entropy_with_logits(z, is_bt.float(), reduction="sum")
    picked = rest.gather(1, target.masked_fill(is_bt, 0)[:, None]).squeeze(1)  # [N]
    ce = (lse - picked)[~is_bt].sum()  # token cross-entropy over the token labels only
    divisor = valid.sum() if num_items is None else num_items
    return (bce + ce) / torch.as_tensor(divisor, device=bce.device).clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------
# Reinforcement learning: masked statistics, advantages, the PPO losses, KL estimators
# ----------------------------------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is true (over everything, or along ``dim``); 0 where nothing is masked in."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``(x - mean) / std`` over the masked entries (0 elsewhere): advantage normalisation.

    The moments come from three sums (of x, of x^2 and the count), so that ``reduce`` (say
    :func:`halluc_rl.distributed.all_sum`) can add them up over processes: the variance is E[x^2] - mean^2.
    """
    stats = torch.stack([(x * mask).sum(), (x**2 * mask).sum(), mask.sum().to(x.dtype)])  # [3]
    if reduce is not None:
        stats = reduce(stats)
    count = stats[2].clamp(min=1)
    mean = stats[0] / count
    return ((x - mean) * torch.rsqrt(stats[1] / count - mean**2 + eps)) * mask


def final_advantages(advantages: torch.Tensor, immediate: torch.Tensor | None, mask: torch.Tensor, whiten: bool,
                     reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The advantages a PPO update uses: the estimator's, plus each action's own ``immediate`` process reward
    (credited to that action alone), then, with ``whiten``, normalised over the rollout by :func:`masked_whiten`."""
    if immediate is not None:
        advantages = advantages + immediate
    return masked_whiten(advantages, mask, reduce=reduce) if whiten else advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016), batched over rows, a reverse scan over time.

    ``rewards``, ``values`` (V of the state before each action) and ``mask`` are [B, S]; an episode ends at its last
    masked action, where the next value is 0 (a finished answer has no future). Returns (advantages, returns) [B, S].
    """
    batch, steps = rewards.shape
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)  # [B]
    next_value = torch.zeros_like(running)  # [B]
    m = mask.to(rewards.dtype)
    for t in reversed(range(steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # [B] TD error
        running = (delta + gamma * lam * running) * m[:, t]
        advantages[:, t] = running
        next_value = values[:, t] * m[:, t]
    return advantages, (advantages + values) * m


def gae_vectorized(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as :func:`gae` in closed form: A_t = sum_k (gamma lam)^(k-t) delta_k, one [S, S] matrix product
    (the reference the scan is tested against)."""
    m = mask.to(rewards.dtype)
    next_values = torch.cat([values[:, 1:] * m[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # [B, S]
    deltas = (rewards + gamma * next_values - values) * m  # [B, S]
    steps = rewards.shape[1]
    t = torch.arange(steps, device=rewards.device)
    power = (t.unsqueeze(0) - t.unsqueeze(1)).to(rewards.dtype)  # [S, S] k - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp(min=0), torch.zeros_like(power))  # [S, S]
    advantages = (deltas @ discount.T) * m  # [B, S]
    return advantages, (advantages + values) * m


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Discounted sums of the rewards from each action to the episode's end [B, S]."""
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0]


def group_advantages(rewards: torch.Tensor, mask: torch.Tensor, group_size: int, gamma: float = 1.0,
                     scale: bool = False) -> torch.Tensor:
    """A critic-free baseline (RLOO, Ahmadian et al. 2024; GRPO's with ``scale``): each action's return-to-go
    minus the mean episode return of the *other* answers to the same prompt (rows ``i*G .. i*G+G-1``), optionally
    divided by the group's return std. The baseline depends on the prompt only, so it adds no bias."""
    returns = returns_to_go(rewards, mask, gamma)  # [B, S]
    totals = returns[:, 0].view(-1, group_size)  # [N, G] episode returns
    if group_size < 2:
        raise ValueError("the group baseline needs group_size >= 2 answers per prompt")
    others = (totals.sum(1, keepdim=True) - totals) / (group_size - 1)  # [N, G] leave-one-out mean
    advantages = (returns - others.reshape(-1, 1)) * mask
    if scale:
        std = totals.std(1, keepdim=True).reshape(-1, 1)  # [B, 1]
        advantages = advantages / (std + 1e-4)
    return advantages


def segment_advantages(rewards: torch.Tensor, mask: torch.Tensor, boundaries: torch.Tensor,
                       values: torch.Tensor) -> torch.Tensor:
    """VinePPO-style advantages (Kazemnejad et al. 2024) from Monte-Carlo values at some states.

    ``boundaries`` [B, S] marks the actions whose *preceding* state has a value estimate ``values`` [B, S] (read
    there only); the state after the last action is terminal (value 0). Every action of a segment between two
    estimated states gets that segment's advantage: its rewards plus V(end) - V(start). A backtrack that is a
    segment of its own gets V(after the deletion) - V(before) plus its (cost) reward.
    """
    batch, steps = rewards.shape
    out = torch.zeros_like(rewards)
    for b in range(batch):
        n = int(mask[b].sum())
        starts = [t for t in range(n) if bool(boundaries[b, t])] or [0]
        if starts[0] != 0:
            starts = [0, *starts]
        ends = [*starts[1:], n]
        for s, e in zip(starts, ends):
            v_end = float(values[b, e]) if e < n else 0.0
            out[b, s:e] = float(rewards[b, s:e].sum()) + v_end - float(values[b, s])
    return out


def min_form_rewards(potentials: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-action rewards whose sum from t to the end is min_{k >= t} potentials_k: PURE's min-form credit
    (Cheng et al. 2025, "Stop Summation"), written as a reward so any advantage estimator applies unchanged.

    ``potentials`` [B, S] are raw process scores after each action (Phi(s_{t+1})); r_t = m_t - m_{t+1} with
    m_t = min_{k >= t} potentials_k and m past the end = 0.
    """
    big = torch.finfo(potentials.dtype).max
    filled = potentials.masked_fill(~mask, big)  # [B, S]
    future_min = torch.flip(torch.cummin(torch.flip(filled, [1]), dim=1).values, [1])  # [B, S]
    future_min = future_min.masked_fill(~mask, 0.0)
    following = torch.cat([future_min[:, 1:], torch.zeros_like(future_min[:, :1])], dim=1)  # [B, S]
    return (future_min - following) * mask


def process_credit(rewards: torch.Tensor, process: torch.Tensor, mask: torch.Tensor, form: str = "delta",
                   credit: str = "return") -> tuple[torch.Tensor, torch.Tensor | None]:
    """How PPO credits the process part ``process`` [B, S] of the summed ``rewards`` [B, S] (a new tensor).

    ``form="min"`` swaps the part for PURE's min-form rewards (:func:`min_form_rewards`; its scores are
    then raw potentials). ``credit="immediate"`` takes it out of the rewards an estimator sees and returns it
    masked, to add to each action's own advantage; ``"return"`` leaves it in (returns None). Subtracting it
    from the sum, rather than summing the other parts, keeps the numbers of the runs recorded so far.
    """
    rewards = rewards.clone()
    if form == "min":
        shaped = min_form_rewards(process, mask)
        rewards += shaped - process
        process = shaped
    elif form != "delta":
        raise ValueError(f"process form must be delta or min, got {form!r}")
    if credit == "immediate":
        rewards -= process
        return rewards, process * mask
    if credit != "return":
        raise ValueError(f"process credit must be return or immediate, got {credit!r}")
    return rewards, None


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-action estimate of KL(pi || pi_ref) from sampled actions (Schulman 2020, "Approximating KL"):
    ``k1`` = log pi - log pi_ref (unbiased, can be negative); ``k3`` = r - 1 - log r with r = pi_ref / pi
    (unbiased, never negative, lower variance)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"kl estimator must be k1 or k3, got {estimator!r}")


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float, normalizer: float | torch.Tensor | None = None):
    """The clipped surrogate (Schulman et al. 2017). Returns (loss, clip fraction, approx KL), over masked actions.

    ``normalizer`` divides the summed loss (default: the number of masked actions), so that several processes
    sharing one global count add up to the single-process loss.
    """
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
    per_action = torch.maximum(unclipped, clipped)
    count = mask.sum() if normalizer is None else normalizer
    loss = (per_action * mask).sum() / torch.as_tensor(count, dtype=per_action.dtype).clamp(min=1)
    with torch.no_grad():
        clipfrac = masked_mean(((ratio - 1).abs() > clip).float(), mask)
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)  # the low-variance k3 form
    return loss, clipfrac, approx_kl


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip: float | None, normalizer: float | torch.Tensor | None = None) -> torch.Tensor:
    """Half the squared error to the returns, clipped around the old values when ``clip`` is set (as in CleanRL)."""
    error = (values - returns) ** 2
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        error = torch.maximum(error, (clipped - returns) ** 2)
    count = mask.sum() if normalizer is None else normalizer
    return 0.5 * (error * mask).sum() / torch.as_tensor(count, dtype=error.dtype).clamp(min=1)


def explained_variance(predicted: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var[target - predicted] / Var[target] over masked entries (1: perfect, <= 0: no better than a constant)."""
    y, p = target[mask], predicted[mask]
    var = y.var() if y.numel() > 1 else torch.tensor(0.0)
    return float("nan") if var == 0 else float(1 - (y - p).var() / var)
