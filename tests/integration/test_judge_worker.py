"""The local judge: JudgeWorker (a Ray worker group on the tiny model) behind Judge, pointwise and pairwise."""
import pytest
import ray

from openrlaif.config import JudgeConfig, RoleResources
from openrlaif.feedback.backends import JudgeRequest, LocalBackend
from openrlaif.feedback.base import JudgeFailure
from openrlaif.feedback.judge import Judge, JudgeWorker
from openrlaif.workers.group import WorkerGroup

PROMPTS = ["what is the sun", "say hello", "name a color", "count to three"]
RESPONSES = ["the sun is a star", "hello", "blue", "one two three"]


@pytest.fixture(scope="module")
def judge_group(ray_cluster, tiny_model):
    group = WorkerGroup("judge-test", JudgeWorker, RoleResources(num_workers=2, num_cpus=1), lambda rank: dict(
        model_path=tiny_model, dtype="float32", threads=1, seed=0, micro_batch_size=3))
    yield group
    group.shutdown()


@pytest.mark.parametrize("overrides,expect_all_fail", [
    ({"min_label_mass": 0.0}, False),
    ({"min_label_mass": 0.99}, True),     # a random model never puts 99% on digits: all unparseable
    ({"readout": "generate", "max_new_tokens": 4}, None),
])
def test_judge_scores_or_fails_typed(judge_group, overrides, expect_all_fail):
    judge = Judge(LocalBackend(judge_group, "tiny"), JudgeConfig(micro_batch_size=3, **overrides))
    result = judge.score(PROMPTS, RESPONSES)
    assert len(result.rewards) == 4
    assert sum(result.failures.values()) == int((~result.valid).sum())
    valid_rewards = result.rewards[result.valid]
    assert ((valid_rewards >= 0) & (valid_rewards <= 1)).all()
    assert result.metrics["judge_prompt_tokens"] > 0
    if expect_all_fail is True:
        assert result.failures == {"unparseable": 4}
    if expect_all_fail is False:
        assert bool(result.valid.all())
        assert len(set(result.rewards.tolist())) > 1     # different responses, different expected scores


def test_generate_readout_scores_exactly_what_the_replies_say(judge_group):
    """The same requests answered by the worker, parsed independently: each verdict's reward is its reply's
    number on the scale, and exactly the replies without one fail."""
    from openrlaif.feedback.judge_prompts import normalise, parse_score, pointwise_messages
    prompts, responses = PROMPTS * 3, [r + suffix for suffix in ("", " ok", " 7") for r in RESPONSES]
    cfg = JudgeConfig(readout="generate", max_new_tokens=24, micro_batch_size=4)
    result = Judge(LocalBackend(judge_group, "tiny"), cfg).score(prompts, responses)
    requests = [JudgeRequest(pointwise_messages(cfg.rubric, p, r, 1, 9, "generate"), None, 24, 0.0)
                for p, r in zip(prompts, responses)]
    replies = ray.get(judge_group.workers[0].complete.remote(requests))
    expected = []
    for reply in replies:
        try:
            expected.append(normalise(parse_score(reply.text, 1, 9), 1, 9))
        except JudgeFailure:
            expected.append(None)
    assert result.valid.tolist() == [value is not None for value in expected]
    assert [round(float(r), 6) for r, ok in zip(result.rewards, result.valid) if ok] == \
        [round(value, 6) for value in expected if value is not None]
    # the random tiny model writes no digits: every verdict is `unparseable`, none is read as a score (the HTTP
    # judge's test reads real "…, so: 6" replies)
    assert result.failures == {"unparseable": len(prompts)}, [reply.text for reply in replies]


def test_pairwise_win_rates_are_swap_debiased_probabilities(judge_group):
    judge = Judge(LocalBackend(judge_group, "tiny"), JudgeConfig(mode="pairwise", min_label_mass=0.0))
    comparisons = judge.compare(PROMPTS[:2], RESPONSES[:2], RESPONSES[2:])
    assert comparisons.judged == 2 and all(0 < p < 1 for p in comparisons.prob)
    # swapping the pair's sides gives exactly the complementary probability
    swapped = judge.compare(PROMPTS[:2], RESPONSES[2:], RESPONSES[:2])
    assert [round(a + b, 6) for a, b in zip(comparisons.prob, swapped.prob)] == [1.0, 1.0]
    assert swapped.flips == comparisons.flips
    rewards = judge.score(["p"] * 3, ["a", "bb", "ccc"])   # one group of three: win rates average to 0.5
    assert bool(rewards.valid.all()) and float(rewards.rewards.mean()) == pytest.approx(0.5, abs=1e-6)


def test_a_label_probability_sums_every_whitespace_variant_of_the_label(judge_group, tiny_model, tiny_tokenizer):
    """The tiny tokenizer has both "7" and "Ġ7" (" 7"): the judge may answer with either, so P("7") is their sum,
    as the HTTP backend's merge of top_logprobs tokens gives."""
    import torch
    from transformers import AutoModelForCausalLM

    from openrlaif.feedback.backends import JudgeRequest
    messages = [{"role": "user", "content": "Rate it from 1 to 9: the sun is a star"}]
    reply = ray.get(judge_group.workers[0].complete.remote([JudgeRequest(messages, ["1", "7"])]))[0]
    ids = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    with torch.no_grad():
        probs = AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits[0, -1].softmax(-1)
    for label in ("1", "7"):
        bare, spaced = tiny_tokenizer.convert_tokens_to_ids([label, "Ġ" + label])
        assert reply.label_probs[label] == pytest.approx(float(probs[bare] + probs[spaced]), rel=1e-4)
        assert float(probs[spaced]) > 0
