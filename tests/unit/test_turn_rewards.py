"""feedback.per_turn: a reward on each assistant turn's last token, the estimators over turn rewards, the scoring of
each turn's prefix (no engine: a scripted sampler)."""
from types import SimpleNamespace

import pytest
import torch

from openrlaif.algorithms.advantages import ADVANTAGE_ESTIMATORS, turn_advantages
from openrlaif.config import ConfigError, validate
from tests.unit.test_config import composed

R = 2 ** -0.5   # GRPO's advantage of a two-sample group with rewards differing by 1: ±0.5 / std = ±0.7071


def test_grpo_over_turns_sums_the_turn_advantages_to_go():
    """Two episodes of one group, two turns each: A_k = GRPO over the group's turn-k rewards; a token of turn 0 gets
    A_0 + A_1, a token of turn 1 gets A_1; observation tokens get 0 (MT-GRPO with λ = 1)."""
    turn_rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    scored = torch.ones(2, 2, dtype=torch.bool)
    turn_of_token = torch.tensor([[0, 0, -1, 1, 1], [0, -1, 1, 1, -1]])
    adv = turn_advantages("grpo", turn_rewards, scored, turn_of_token, group_ids=torch.tensor([0, 0]),
                          valid=torch.tensor([True, True]), token_mask=(turn_of_token >= 0).float())
    # turn 0: rewards (1, 0) -> (+R, -R); turn 1: equal rewards -> (0, 0)
    assert torch.allclose(adv, torch.tensor([[R, R, 0, 0, 0], [-R, 0, 0, 0, 0]]), atol=1e-5)
    turn_rewards[:, 1] = torch.tensor([0.0, 1.0])   # turn 1 now favours episode 1: it cancels turn 0 for episode 0
    adv = turn_advantages("grpo", turn_rewards, scored, turn_of_token, group_ids=torch.tensor([0, 0]),
                          valid=torch.tensor([True, True]), token_mask=(turn_of_token >= 0).float())
    assert torch.allclose(adv, torch.tensor([[0, 0, 0, -R, -R], [0, 0, R, R, 0]]), atol=1e-5)


def test_a_turn_only_some_episodes_reached_is_compared_among_them():
    """Three episodes of a group; only two reach turn 1. RLOO's turn-1 advantage is over those two; the one-turn
    episode's tokens get its turn-0 advantage only."""
    turn_rewards = torch.tensor([[0.5, 1.0], [0.2, 0.0], [0.8, 0.0]])
    scored = torch.tensor([[True, True], [True, True], [True, False]])
    turn_of_token = torch.tensor([[0, -1, 1], [0, -1, 1], [0, 0, -1]])
    adv = turn_advantages("rloo", turn_rewards, scored, turn_of_token, group_ids=torch.zeros(3, dtype=torch.long),
                          valid=torch.ones(3, dtype=torch.bool), token_mask=(turn_of_token >= 0).float())
    a0 = [0.5 - 0.5, 0.2 - 0.65, 0.8 - 0.35]          # r_i − mean of the other two
    a1 = [1.0 - 0.0, 0.0 - 1.0]
    expected = torch.tensor([[a0[0] + a1[0], 0, a1[0]], [a0[1] + a1[1], 0, a1[1]], [a0[2], a0[2], 0]])
    assert torch.allclose(adv, expected, atol=1e-6)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "gae"])
def test_one_turn_per_episode_is_the_estimators_own_advantage(name):
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.float32)
    rewards, groups = torch.tensor([0.3, 0.9, 0.1, 0.5]), torch.tensor([0, 0, 1, 1])
    valid = torch.tensor([True, True, True, True])
    inputs = dict(group_ids=groups, valid=valid, token_mask=mask, kl=torch.rand(4, 4) * mask, kl_coef=0.05,
                  values=torch.rand(4, 4), gamma=1.0, lam=0.95)
    own = ADVANTAGE_ESTIMATORS[name](rewards=rewards, **inputs)
    turned = turn_advantages(name, rewards.unsqueeze(-1), valid.unsqueeze(-1),
                             torch.where(mask > 0, 0, -1), **inputs)
    if name == "gae":
        own, turned = own[0], turned[0]
    if own.dim() == 1:
        own = own.unsqueeze(-1) * mask
    assert torch.allclose(own, turned, atol=1e-6)


def test_token_level_returns_add_the_later_turns_rewards():
    """PPO's GAE with γ = λ = 1 and zero values: each token's return is the sum of its own and later turns' rewards
    (observation tokens carry none); REINFORCE++'s unwhitened returns are the same."""
    turn_rewards = torch.tensor([[0.25, 1.0]])
    turn_of_token = torch.tensor([[0, 0, -1, -1, 1, -1]])
    mask = (turn_of_token >= 0).float()
    _, returns = turn_advantages("gae", turn_rewards, torch.ones(1, 2, dtype=torch.bool), turn_of_token,
                                 group_ids=torch.tensor([0]), valid=torch.tensor([True]), token_mask=mask,
                                 values=torch.zeros(1, 6), gamma=1.0, lam=1.0)
    assert torch.allclose(returns, torch.tensor([[1.25, 1.25, 0, 0, 1.0, 0]]))
    from openrlaif.algorithms.advantages import shaped_token_rewards
    token_rewards = torch.tensor([[0.0, 0.25, 0, 0, 1.0, 0]])
    shaped = shaped_token_rewards(torch.zeros(1), mask, None, 0.0, token_rewards)
    assert torch.allclose(shaped.flip(-1).cumsum(-1).flip(-1) * mask, returns)


class Stepwise:
    """Three turns; each observation comes with a reward (0.1 × the turn) and the episode ends with reward 1."""

    quit_on = None   # an assistant turn that ends the episode at once

    def __init__(self) -> None:
        self.turn = 0

    def reset(self, row):
        return list(row["messages"])

    def step(self, messages, assistant_turn):
        from openrlaif.envs import EnvStep
        self.turn += 1
        if self.turn == 3 or assistant_turn == self.quit_on:
            return EnvStep(None, 1.0)
        return EnvStep([{"role": "tool", "content": f"result {self.turn}"}], 0.1 * self.turn)


def count_turns(prompts, responses):
    """A rule that shows which prefix it was given: a tenth per rendered assistant turn beyond the first."""
    return [response.count("Assistant:") / 10 for response in responses]


def episodes(tiny_tokenizer, lengths=(3, 3, 3, 3)):
    """Four episodes of Stepwise from a scripted sampler, two per prompt."""
    from openrlaif.config import Config, EnvConfig, RolloutConfig
    from openrlaif.data import load_prompts
    from openrlaif.envs import env_factory
    from openrlaif.rollout.multi_turn import run_episodes
    from openrlaif.rollout.types import Completion
    cfg = Config(rollout=RolloutConfig(max_new_tokens=4),
                 env=EnvConfig(name="tests.unit.test_turn_rewards:Stepwise", max_turns=3, max_total_tokens=400))
    prompts = load_prompts("demo", tiny_tokenizer, 256, env=env_factory(cfg.env))[:2]
    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")

    def turn(index: int, size: int = 2) -> Completion:
        return Completion(index, [40 + index] * size + [end], [-0.5] * (size + 1), True)

    def sample(contexts, spec):
        return [turn(i) for i in range(len(contexts))]
    first = [turn(0), turn(0, 3), turn(1), turn(1, 1)]
    return run_episodes(sample, prompts, first, cfg, tiny_tokenizer, seed=0)


def test_each_turn_is_scored_as_the_episode_up_to_it(tiny_tokenizer):
    from openrlaif.feedback.rules import FunctionFeedback
    from openrlaif.pipelines.online_rl import score
    batch = episodes(tiny_tokenizer)
    assert batch["group_ids"].tolist() == [0, 0, 1, 1] and batch.meta["env_turns"] == [3] * 4
    result = score(SimpleNamespace(feedback=FunctionFeedback("tests.unit.test_turn_rewards:count_turns", {})),
                   batch, per_turn=True)
    # turn 0: one assistant turn, rendered as its text (0.0); turn 1: "Assistant: ..., Tool: ..., Assistant: ..."
    assert torch.allclose(batch["turn_rewards"], torch.tensor([[0.0, 0.2, 0.3]] * 4)) and batch["turn_scored"].all()
    assert torch.allclose(result.rewards, torch.full((4,), 0.3)) and result.metrics["turns_scored"] == 8.0
    turn_of_token, mask = batch["turn_of_token"], batch["response_mask"]
    assert torch.equal(turn_of_token >= 0, mask > 0)          # every policy token has its turn, nothing else
    first_turn = turn_of_token[1][turn_of_token[1] == 0]
    assert len(first_turn) == 4 and set(turn_of_token[1].tolist()) == {-1, 0, 1, 2}   # 3 tokens + end; 3 turns
    ends = [t for t in range(mask.shape[1]) if mask[0, t] > 0 and (t + 1 == mask.shape[1] or mask[0, t + 1] == 0)]
    assert [turn_of_token[0, t].item() for t in ends] == [0, 1, 2]   # each run of policy tokens is one turn


def test_env_rewards_per_turn_and_a_comparing_judge_sees_turn_k_beside_turn_k(tiny_tokenizer):
    from openrlaif.envs import EnvReward
    from openrlaif.feedback.base import FeedbackResult
    from openrlaif.pipelines.online_rl import score
    batch = episodes(tiny_tokenizer)
    assert batch.meta["env_turn_rewards"] == [[0.1, 0.2, None]] * 4
    score(SimpleNamespace(feedback=EnvReward()), batch, per_turn=True)
    assert torch.allclose(batch["turn_rewards"], torch.tensor([[0.1, 0.2, 1.0]] * 4))

    class Comparing:
        """Records the groups it is asked to compare; the first of each group wins."""
        calls = []

        def score(self, prompts, responses, group_ids=None, conversations=None):
            self.calls.append((list(responses), list(group_ids)))
            first = {}
            return FeedbackResult.from_scores([float(first.setdefault(g, i) == i) for i, g in enumerate(group_ids)])
    judge = Comparing()
    result = score(SimpleNamespace(feedback=judge), batch, per_turn=True, compares=True)
    (_, whole_groups), (prefixes, turn_groups) = judge.calls
    assert whole_groups == [0, 0, 1, 1] and len(prefixes) == 8
    # a group per (rollout group, turn), apart from the trajectory groups
    assert len(set(turn_groups)) == 4 and not set(turn_groups) & {0, 1}
    assert turn_groups[0] == turn_groups[2] and turn_groups[0] != turn_groups[1]   # (row 0, k 0) with (row 1, k 0)
    assert batch["turn_rewards"][:, :2].tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    assert result.valid.all()


def test_a_failed_turn_verdict_masks_its_sample(tiny_tokenizer):
    from openrlaif.feedback.base import FeedbackResult
    from openrlaif.pipelines.online_rl import score

    class FailsOnPrefixes:
        def score(self, prompts, responses, group_ids=None, conversations=None):
            return FeedbackResult.from_scores([None if "result 2" not in r and "Assistant:" in r else 0.5
                                               for r in responses], ["unparsable" if "result 2" not in r and
                                                                     "Assistant:" in r else None for r in responses])
    batch = episodes(tiny_tokenizer)
    result = score(SimpleNamespace(feedback=FailsOnPrefixes()), batch, per_turn=True)
    assert not result.valid.any() and result.failures["unparsable"] == 4   # each episode's turn-1 prefix


def test_per_turn_settings_are_checked_at_start_up():
    validate(composed("env=tool_use", "feedback=env", "data.prompts=calculator", "feedback.per_turn=true"))
    validate(composed("env=tool_use", "data.prompts=calculator", "feedback.per_turn=true", "algorithm=grpo",
                      "feedback.judge.mode=pairwise"))
    for overrides, needle in (
            (["feedback.per_turn=true"], "env.name is unset"),
            (["env=tool_use", "feedback=env", "feedback.per_turn=true", "algorithm=remax"], "no per-turn form"),
            (["env=tool_use", "feedback.per_turn=true", "algorithm=reinforce_pp", "feedback.judge.mode=pairwise"],
             "nobody to be compared with"),
            (["env=tool_use", "feedback.per_turn=true", "feedback.transform=lsc"], "do not score turns"),
    ):
        with pytest.raises(ConfigError, match=needle):
            validate(composed(*overrides))


def test_a_comparing_judge_is_not_asked_about_a_turn_only_one_episode_reached(tiny_tokenizer, monkeypatch):
    """Episode 3 quits after its first turn: turns 0 and 1 of its group were reached by episode 2 alone, so a
    comparing judge is shown them beside nobody; they get no reward (turn_scored false), their GRPO advantage is 0,
    and the one-turn episode is scored as a whole."""
    from openrlaif.feedback.base import FeedbackResult
    from openrlaif.pipelines.online_rl import score
    monkeypatch.setattr(Stepwise, "quit_on", tiny_tokenizer.decode([41]))
    batch = episodes(tiny_tokenizer)
    assert batch.meta["env_turns"] == [3, 3, 3, 1]
    asked = []

    class Comparing:
        def score(self, prompts, responses, group_ids=None, conversations=None):
            asked.append(list(group_ids))
            return FeedbackResult.from_scores([0.5] * len(responses))
    score(SimpleNamespace(feedback=Comparing()), batch, per_turn=True, compares=True)
    assert len(asked[1]) == 4                                  # turns 0 and 1 of rows 0 and 1 only
    assert batch["turn_scored"].tolist() == [[True, True, True], [True, True, True], [False, False, True],
                                             [True, False, False]]
