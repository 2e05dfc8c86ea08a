"""Advantage estimators. Keys of ADVANTAGE_ESTIMATORS are the names users type (`algorithm.advantage=grpo`)."""
import torch
from torch import Tensor


def grpo_advantages(rewards: Tensor, group_ids: Tensor, valid: Tensor, eps: float = 1e-6,
                    normalize_std: bool = True, **_) -> Tensor:
    """GRPO outcome advantages (DeepSeekMath §4.1.2): A_i = (r_i − mean(r_group)) / (std(r_group) + eps).

    rewards, group_ids, valid: (B,). Samples with valid=False (e.g. the judge failed) take no part in their
    group's statistics and get advantage 0; they are also masked out of the loss by the caller.
    std is the unbiased sample std (as in the paper's reference code and TRL); a group with one valid sample
    has std 0 and so advantage 0. normalize_std=False gives the Dr. GRPO numerator r_i − mean.
    """
    valid_f = valid.to(rewards.dtype)
    advantages = torch.zeros_like(rewards)
    for group in torch.unique(group_ids):
        in_group = (group_ids == group) & valid
        count = int(in_group.sum())
        if count == 0:
            continue
        group_rewards = rewards[in_group]
        centered = group_rewards - group_rewards.mean()
        if normalize_std:
            std = group_rewards.std(unbiased=True) if count > 1 else torch.zeros((), dtype=rewards.dtype)
            # equal rewards: centred values are exactly 0; keep them 0 rather than 0/0 when eps is 0
            centered = centered / (std + eps) if float(std + eps) > 0 else torch.zeros_like(centered)
        advantages[in_group] = centered
    return advantages * valid_f


def dr_grpo_advantages(rewards: Tensor, group_ids: Tensor, valid: Tensor, **_) -> Tensor:
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): r_i − mean(r_group), no std division."""
    return grpo_advantages(rewards, group_ids, valid, normalize_std=False)


def rloo_advantages(rewards: Tensor, group_ids: Tensor, valid: Tensor, **_) -> Tensor:
    """RLOO (Ahmadian et al. 2024): A_i = r_i − mean_{j≠i} r_j over the valid samples of i's group."""
    advantages = torch.zeros_like(rewards)
    for group in torch.unique(group_ids):
        in_group = (group_ids == group) & valid
        count = int(in_group.sum())
        if count < 2:
            continue   # no other sample to form a baseline
        group_rewards = rewards[in_group]
        advantages[in_group] = group_rewards - (group_rewards.sum() - group_rewards) / (count - 1)
    return advantages


def remax_advantages(rewards: Tensor, baseline_rewards: Tensor, valid: Tensor, **_) -> Tensor:
    """ReMax (Li et al. 2024, eq. 5): A = r(x, y) − r(x, ŷ_greedy), the greedy response's reward per prompt
    (`baseline_rewards`, already broadcast to each sample)."""
    return (rewards - baseline_rewards) * valid.to(rewards.dtype)


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the unmasked entries (global normalisation, REINFORCE++)."""
    mask_f = mask.to(values.dtype)
    count = mask_f.sum().clamp(min=1.0)
    mean = (values * mask_f).sum() / count
    var = (((values - mean) * mask_f) ** 2).sum() / count
    return (values - mean) * torch.rsqrt(var + eps) * mask_f


def reinforce_pp_advantages(rewards: Tensor, token_mask: Tensor, kl: Tensor | None = None, kl_coef: float = 0.0,
                            group_ids: Tensor | None = None, valid: Tensor | None = None,
                            baseline: bool = False, token_rewards: Tensor | None = None, **_) -> Tensor:
    """REINFORCE++ (Hu 2025): per-token returns G_t = Σ_{k≥t} r_k with r_k = −β·KL_k plus the sequence reward on
    the last token (γ = 1), then whitened over all tokens of the batch. baseline=True is REINFORCE++-baseline:
    the group mean reward is subtracted first. Shapes: rewards (B,), token_mask/kl (B, T); returns (B, T).
    `token_rewards` (B, T), when given, replaces the sequence reward on the last token (feedback.per_turn)."""
    mask = token_mask.to(rewards.dtype)
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    if baseline:
        if group_ids is None:
            raise ValueError("reinforce_pp with baseline needs group_ids")
        centred = rewards.clone()
        for group in torch.unique(group_ids):
            in_group = (group_ids == group) & valid
            if in_group.any():
                centred[in_group] = rewards[in_group] - rewards[in_group].mean()
        rewards = centred
    if baseline and token_rewards is not None:
        raise ValueError("reinforce_pp with baseline centres sequence rewards; centre per-turn rewards first")
    returns = shaped_token_rewards(rewards, mask, kl, kl_coef, token_rewards).flip(-1).cumsum(-1).flip(-1) * mask
    return whiten(returns, mask * valid.unsqueeze(-1).to(mask.dtype))


def shaped_token_rewards(rewards: Tensor, mask: Tensor, kl: Tensor | None, kl_coef: float,
                         token_rewards: Tensor | None = None) -> Tensor:
    """Per-token rewards r_t = −β·KL_t, plus the sequence reward on each row's last response token, or plus the
    given `token_rewards` (B, T) in its place; (B, T)."""
    penalty = -kl_coef * kl * mask if kl is not None else torch.zeros_like(mask)
    if token_rewards is not None:
        return penalty + token_rewards * mask
    token_rewards = penalty
    last = (mask.cumsum(-1) == mask.sum(-1, keepdim=True)) & (mask > 0)
    return token_rewards + last.to(rewards.dtype) * rewards.unsqueeze(-1)


def gae_advantages(token_rewards: Tensor, values: Tensor, token_mask: Tensor, gamma: float = 1.0,
                   lam: float = 0.95, **_) -> tuple[Tensor, Tensor]:
    """GAE (Schulman et al. 2016, eq. 16): δ_t = r_t + γV_{t+1} − V_t, A_t = Σ_l (γλ)^l δ_{t+l}; returns = A + V.
    Shapes (B, T). Only positions with mask 1 are steps: t+1 is the next such position, so the masked tokens
    inside a row (a multi-turn episode's observations: tool results, user turns) are skipped, carrying no reward
    and no value target, and positions past a response's end contribute nothing."""
    mask = token_mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(running)
    for t in reversed(range(values.shape[1])):
        step = mask[:, t] > 0
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(step, delta + gamma * lam * running, running)
        next_value = torch.where(step, values[:, t], next_value)
        advantages[:, t] = running * mask[:, t]
    return advantages, advantages + values


def ppo_advantages(rewards: Tensor, token_mask: Tensor, values: Tensor, valid: Tensor, kl: Tensor | None = None,
                   kl_coef: float = 0.0, gamma: float = 1.0, lam: float = 0.95, token_rewards: Tensor | None = None,
                   **_) -> tuple[Tensor, Tensor]:
    """PPO as in InstructGPT / OpenRLHF: per-token rewards −β·KL_t plus the sequence reward on the last token,
    GAE on the critic's values V(s_t). Returns (advantages whitened over the valid tokens, returns = GAE + V:
    the critic's regression targets, not whitened). Shapes (B, T); invalid samples get zeros."""
    mask = token_mask.to(values.dtype) * valid.unsqueeze(-1).to(values.dtype)
    advantages, returns = gae_advantages(shaped_token_rewards(rewards, mask, kl, kl_coef, token_rewards), values,
                                         mask, gamma, lam)
    return whiten(advantages, mask), returns * mask


def reinforce_pp_baseline_advantages(rewards: Tensor, token_mask: Tensor, **kwargs) -> Tensor:
    """REINFORCE++-baseline: group-mean-centred rewards, then KL-shaped returns, whitened over the batch."""
    return reinforce_pp_advantages(rewards, token_mask, baseline=True, **kwargs)


def turn_advantages(name: str, turn_rewards: Tensor, turn_scored: Tensor, turn_of_token: Tensor, group_ids: Tensor,
                    valid: Tensor, token_mask: Tensor, **kwargs) -> Tensor | tuple[Tensor, Tensor]:
    """feedback.per_turn: estimator `name` with a reward r_k for each assistant turn k of an episode, on the turn's
    last token. Shapes: turn_rewards / turn_scored (B, K) (scored: the episode reached turn k and it has a reward),
    turn_of_token (B, T) (the turn of each policy token, -1 elsewhere).

    Token-level estimators (REINFORCE++, PPO's GAE) take the r_k as per-token rewards: a token's return is the sum
    of its own and later turns' rewards (γ = 1; GAE with its γ, λ). REINFORCE++-baseline first centres each r_k on
    the mean r_k of the group's episodes that reached turn k. Outcome estimators (GRPO, Dr. GRPO, RLOO) compute
    their advantage A_k of each turn k within the group's episodes that reached it, and give a token of turn k the
    sum Σ_{j≥k} A_j: the turn-level credit assignment of MT-GRPO (Zeng et al. 2025, "Reinforcing Multi-Turn
    Reasoning in LLM Agents via Turn-Level Credit Assignment": A_1 = Â^turn + λ·Â^outcome, A_2 = Â^outcome), over
    any number of turns with λ = 1. One turn per episode gives the estimator's own advantages exactly."""
    estimator = ADVANTAGE_ESTIMATORS[name]
    index = turn_of_token.clamp(min=0)
    policy = (turn_of_token >= 0).to(turn_rewards.dtype)
    if name in TOKEN_LEVEL:
        rewards = turn_rewards.clone() * turn_scored
        if name == "reinforce_pp_baseline":
            for k in range(rewards.shape[1]):
                for group in torch.unique(group_ids):
                    in_group = (group_ids == group) & valid & turn_scored[:, k]
                    if in_group.any():
                        rewards[in_group, k] -= turn_rewards[in_group, k].mean()
            estimator = ADVANTAGE_ESTIMATORS["reinforce_pp"]
        last = policy * (torch.nn.functional.pad(turn_of_token, (0, 1), value=-1)[:, 1:] != turn_of_token)
        token_rewards = torch.gather(rewards, 1, index) * last
        return estimator(rewards=torch.zeros_like(turn_rewards[:, 0]), group_ids=group_ids, valid=valid,
                         token_mask=token_mask, token_rewards=token_rewards, **kwargs)
    if name not in GROUP_BASELINES:
        raise ValueError(f"feedback.per_turn: algorithm.advantage={name} has no per-turn form")
    per_turn = torch.stack([estimator(rewards=turn_rewards[:, k], group_ids=group_ids, valid=valid & turn_scored[:, k],
                                      token_mask=token_mask, **kwargs) for k in range(turn_rewards.shape[1])], dim=1)
    to_go = per_turn.flip(-1).cumsum(-1).flip(-1)
    return torch.gather(to_go, 1, index) * policy * valid.unsqueeze(-1).to(policy.dtype)


def distillation_advantages(advantages: Tensor, student_logprobs: Tensor, teacher_logprobs: Tensor,
                            token_mask: Tensor, coef: float) -> Tensor:
    """On-policy distillation (Agarwal et al. 2024, GKD; Lu & Thinking Machines 2025): each sampled token's
    advantage gains coef·(log π_teacher(y_t) − log π_student(y_t)), the negative per-token reverse KL to the
    teacher (discount 0), on top of the feedback's advantages (B,) or (B, T). Returns (B, T), 0 off the mask."""
    mask = token_mask.to(student_logprobs.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1) * mask
    return advantages + coef * (teacher_logprobs - student_logprobs) * mask


# What the online loop calls, by `algorithm.advantage`. Each takes keyword inputs from the step's batch
# (rewards, group_ids, valid, token_mask, kl, kl_coef, normalize_std) and ignores what it does not need;
# outcome estimators return (B,), token-level ones (B, T). remax reads baseline_rewards (the greedy response's
# reward, which the loop adds for GREEDY_BASELINE estimators). CRITIC estimators read `values` (the critic's V(s_t)),
# take gamma/lam, and return (advantages, returns).
ADVANTAGE_ESTIMATORS = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
    "reinforce_pp": reinforce_pp_advantages,
    "reinforce_pp_baseline": reinforce_pp_baseline_advantages,
    "remax": remax_advantages,
    "gae": ppo_advantages,
}
TOKEN_LEVEL = {"reinforce_pp", "reinforce_pp_baseline", "gae"}   # need token_mask and (with kl_in_reward) kl
GROUP_BASELINES = {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"}   # need >= 2 samples per prompt
GREEDY_BASELINE = {"remax"}                     # need one greedy rollout per prompt, scored with the samples
CRITIC = {"gae"}                                # need the critic role's values; return (advantages, returns)
