"""The simulated labeller: its noise model (accuracy, position and length bias, inconsistency), its reading of
every judge prompt the framework renders, and the framework's real HTTP judge talking to it over 127.0.0.1."""
import math
import random

import pytest

from openrlaif.config import JudgeConfig
from openrlaif.feedback.backends import HTTPBackend
from openrlaif.feedback.gold import concise
from openrlaif.feedback.judge import Judge
from openrlaif.feedback.judge_prompts import (PAIRWISE_RUBRIC, after_rationale, listwise_messages, pairwise_messages,
                                              pairwise_after_rationale, pointwise_messages)
from openrlaif.labeller import (Labeller, LabellerServer, NoiseModel, pairwise_prob, plackett_luce,
                                pointwise_distribution, read_task)

GOOD, BAD = "Paris is the capital.", "Well, " + "let me think about that for a long while " * 4


def test_gold_concise_reads_length_finish_and_filler():
    assert concise([""] * 5, ["Paris.", "Paris", " ".join(["w"] * 30) + ".", "I'm sorry, Paris.", ""]) == \
        [1.0, 0.5, 0.5, 0.0, 0.0]
    assert concise([""], [" ".join(["w"] * 40) + "."]) == [0.0]
    assert concise([""], ["One two three four."], max_words=2) == [0.0]


def test_accuracy_is_the_chance_of_the_gold_choice_without_biases():
    noise = NoiseModel(accuracy=0.8)
    assert pairwise_prob(1.0, 0.2, 3, 3, noise) == pytest.approx(0.8)
    assert pairwise_prob(0.2, 1.0, 3, 3, noise) == pytest.approx(0.2)
    assert pairwise_prob(0.5, 0.5, 3, 30, noise) == 0.5                    # a gold tie is a coin flip
    assert pairwise_prob(1.0, 0.0, 3, 3, NoiseModel(accuracy=1.0)) > 1 - 1e-8


def test_position_and_length_biases_are_extra_logits():
    biased = NoiseModel(accuracy=0.8, position_bias=2.0)
    assert pairwise_prob(0.5, 0.5, 3, 3, biased) == pytest.approx(1 / (1 + math.exp(-2)))
    p_first, p_second = pairwise_prob(1.0, 0.2, 3, 3, biased), pairwise_prob(0.2, 1.0, 3, 3, biased)
    assert p_first > 0.95 and p_second > 0.5            # shown second, the better one still loses
    assert (p_first + 1 - p_second) / 2 > 0.5           # swap debiasing recovers the gold order
    longer = NoiseModel(accuracy=0.5, length_bias=1.0)
    assert pairwise_prob(0.5, 0.5, 30, 10, longer) == pytest.approx(1 / (1 + math.exp(-2)))


def test_pointwise_distribution_is_centred_on_the_perceived_quality():
    dist = pointwise_distribution(1.0, 1, 9)
    assert sum(dist.values()) == pytest.approx(1) and max(dist, key=dist.get) == 9
    mean = sum(s * p for s, p in pointwise_distribution(0.5, 1, 9).items())
    assert mean == pytest.approx(5.0)


def test_plackett_luce_fixed_noise_is_consistent_and_fresh_noise_is_not():
    fixed = [0.3, -0.1, 0.2]
    rng = random.Random(0)
    assert len({tuple(plackett_luce([3.0, 0.0, 1.0], rng, fixed, 0.0)) for _ in range(20)}) == 1
    assert len({tuple(plackett_luce([0.0, 0.0, 0.0], rng, fixed, 1.0)) for _ in range(50)}) > 1


def test_every_judge_prompt_is_read():
    task = read_task(pairwise_messages(PAIRWISE_RUBRIC, "Q?", "a\n\nsecond paragraph", "b", "probs"))
    assert (task.kind, task.prompt, task.responses) == ("pairwise", "Q?", ("a\n\nsecond paragraph", "b"))
    labelled = read_task(pairwise_messages(PAIRWISE_RUBRIC, "Q?", "a", "b", "probs", labels=("(A)", "(B)")))
    assert labelled.labels == ("(A)", "(B)")
    point = read_task(pointwise_messages("Rate {score_min}-{score_max}.", "Q?", "r", 0, 5, "probs"))
    assert (point.kind, point.responses, point.scale) == ("pointwise", ("r",), (0, 5))
    ranked = read_task(listwise_messages("Rank.", "Q?", ["x", "y", "z"]))
    assert (ranked.kind, ranked.responses) == ("listwise", ("x", "y", "z"))
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"}]
    assert read_task(pairwise_messages(PAIRWISE_RUBRIC, "Q?", "a", "b", "probs", conversation)).prompt == "Q?"
    first = pairwise_messages(PAIRWISE_RUBRIC, "Q?", "a", "b", "rationale")
    assert read_task(first).kind == "rationale"
    assert read_task(after_rationale(first, "why", pairwise_after_rationale(("A", "B")))).responses == ("a", "b")
    assert read_task([{"role": "user", "content": "Reply with OK."}]).kind == "other"


def test_inconsistency_makes_repeats_differ_reproducibly():
    body = {"messages": pairwise_messages(PAIRWISE_RUBRIC, "Q?", GOOD, BAD, "generate"), "seed": 0}

    def verdicts(noise):
        labeller = Labeller(noise=noise)
        return [labeller.answer(body)["choices"][0]["message"]["content"] for _ in range(30)]

    steady = verdicts(NoiseModel(accuracy=0.7))
    assert len(set(steady)) == 1                                   # deterministic: the same answer each time
    shaky = verdicts(NoiseModel(accuracy=0.7, inconsistency=2.0, seed=3))
    assert len(set(shaky)) == 2 and shaky == verdicts(NoiseModel(accuracy=0.7, inconsistency=2.0, seed=3))


def test_bad_noise_settings_are_refused():
    for bad in (dict(accuracy=0.4), dict(accuracy=1.2), dict(inconsistency=-1.0), dict(position_bias=math.inf)):
        with pytest.raises(ValueError):
            NoiseModel(**bad).check()


@pytest.fixture
def serve():
    servers = []

    def start(**noise):
        server = LabellerServer(Labeller(noise=NoiseModel(**noise))).start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        server.stop()


def judge_for(server, **settings) -> Judge:
    cfg = JudgeConfig(**(dict(backend="http", base_url=server.base_url, model="labeller", api_key_env="",
                              top_logprobs=20, min_label_mass=0.5, cache=False) | settings))
    backend = HTTPBackend(cfg.base_url, cfg.model, "", 5.0, 0, 0.01, 4, cfg.top_logprobs)
    backend.probe()
    return Judge(backend, cfg)


def test_the_http_judge_through_the_labeller_needs_swap_against_position_bias(serve):
    server = serve(accuracy=0.9, position_bias=4.0)
    prompts = [f"question {i}" for i in range(12)]
    good = [f"Answer {i}." for i in range(12)]
    bad = [f"Answer {i} " + "and more words " * 8 for i in range(12)]
    # half the pairs show the better answer first, half second
    firsts = [g if i % 2 else b for i, (g, b) in enumerate(zip(good, bad))]
    seconds = [b if i % 2 else g for i, (g, b) in enumerate(zip(good, bad))]
    truth = [i % 2 == 1 for i in range(12)]              # True: the first shown is the better one
    swapped = judge_for(server).compare(prompts, firsts, seconds)
    assert [p > 0.5 for p in swapped.prob] == truth and swapped.flips == 12
    one_order = judge_for(server, swap=False).compare(prompts, firsts, seconds)
    assert all(p > 0.5 for p in one_order.prob)         # position A always wins: half the labels are wrong
    assert server.labeller.requests["pairwise"] == 12 * 3


def test_the_pointwise_readout_through_the_labeller_follows_the_gold(serve):
    server = serve(accuracy=0.9, score_noise=0.0)
    result = judge_for(server).pointwise(["q"] * 3, ["Paris.", "Paris", " ".join(["w"] * 35) + "."])
    rewards = result.rewards.tolist()
    assert result.valid.all() and rewards[0] > rewards[1] > rewards[2]
    assert rewards[0] > 0.9 and rewards[1] == pytest.approx(0.5, abs=1e-4)   # 1.0 and 0.5 gold, on a 1..9 scale
