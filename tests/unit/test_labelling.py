"""Pair selection from scored groups, dataset rows, online-DPO pair batches, Constitutional AI prompts, and the
validation of the AI-feedback pipelines."""
import pytest
import torch

from openrlaif.batch import Batch
from openrlaif.config import (Config, ConfigError, ConstitutionConfig, FeedbackConfig, JudgeConfig, LabelConfig,
                              Principle, RolloutConfig, validate)
from openrlaif.data.labelling import pair_row, select_pairs
from openrlaif.feedback.base import JudgeFailure
from openrlaif.feedback.judge_prompts import clean_revision, critique_messages, revision_messages
from openrlaif.pipelines.online_dpo import pairs_from_rollout


def test_best_worst_takes_the_extremes_of_each_group_and_skips_what_carries_no_label():
    groups = [0, 0, 0, 1, 1, 2, 2, 3, 3]
    rewards = [0.2, 0.9, 0.1, 0.5, 0.5, 0.7, 0.1, 0.3, 0.8]
    valid = [True, True, True, True, True, True, False, True, True]
    responses = ["a", "b", "c", "d", "e", "f", "g", "same", "same"]
    pairs, skipped = select_pairs(groups, rewards, valid, responses)
    assert [(p.group, p.chosen, p.rejected) for p in pairs] == [(0, 1, 2)]
    assert pairs[0].gap == pytest.approx(0.8)
    assert skipped == {"tie": 1, "too_few_scored": 1, "identical": 1}


def test_min_gap_and_all_pairs():
    groups, rewards, valid = [0, 0, 0], [0.0, 0.5, 0.55], [True] * 3
    pairs, skipped = select_pairs(groups, rewards, valid, ["x", "y", "z"], "all", min_gap=0.1)
    assert {(p.chosen, p.rejected) for p in pairs} == {(1, 0), (2, 0)} and skipped == {"tie": 1}
    best_worst, _ = select_pairs(groups, rewards, valid, ["x", "y", "z"], "best_worst", min_gap=0.6)
    assert best_worst == []


def test_equal_rewards_pick_the_earliest_best_and_the_latest_worst():
    pairs, _ = select_pairs([0, 0, 0, 0], [1.0, 0.0, 1.0, 0.0], [True] * 4, ["a", "b", "c", "d"])
    assert (pairs[0].chosen, pairs[0].rejected) == (0, 3)


def test_pair_rows_are_what_the_pairs_loader_reads():
    assert pair_row("q", [{"role": "user", "content": "q"}], "good", "bad", 0.9, 0.1) == {
        "prompt": "q", "chosen": "good", "rejected": "bad", "chosen_score": 0.9, "rejected_score": 0.1}
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"}]
    row = pair_row("q", messages, "good", "bad", 1.0, 0.0)
    assert row["chosen"] == messages + [{"role": "assistant", "content": "good"}] and "prompt" not in row
    assert row["rejected"][-1] == {"role": "assistant", "content": "bad"}


def test_online_dpo_pair_batch_has_a_row_per_prompt_and_masks_prompts_without_a_pair():
    from openrlaif.data.labelling import LabelledPair
    size, width = 6, 5
    batch = Batch({"input_ids": torch.arange(size * width).view(size, width), "attention_mask": torch.ones(size, width),
                   "response_mask": torch.ones(size, 3), "group_ids": torch.tensor([0, 0, 0, 1, 1, 1])})
    out = pairs_from_rollout(batch, [LabelledPair(group=0, chosen=2, rejected=0, gap=0.5)], num_prompts=2)
    assert len(out) == 2 and out["pair_mask"].tolist() == [1.0, 0.0]
    assert torch.equal(out["chosen_input_ids"][0], batch["input_ids"][2])
    assert torch.equal(out["rejected_input_ids"][0], batch["input_ids"][0])
    assert out["ref_chosen_logps"].tolist() == [0.0, 0.0]


def test_constitutional_messages_keep_the_policy_conversation():
    prompt = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}]
    critique = critique_messages(prompt, "answer", "Find errors.")
    assert critique[:2] == prompt and critique[2] == {"role": "assistant", "content": "answer"}
    assert critique[3]["content"] == "Critique request: Find errors."
    revision = revision_messages(prompt, "answer", "Find errors.", "It is wrong.", "Fix it.")
    assert revision[:4] == critique and revision[4] == {"role": "assistant", "content": "It is wrong."}
    assert revision[5]["content"].startswith("Revision request: Fix it.")


@pytest.mark.parametrize("reply,expected", [("Revision: Paris.", "Paris."), ("**Revised response:** \"Paris.\"", "Paris."),
                                            ("  Paris is the capital. ", "Paris is the capital."),
                                            ("rewritten response: 'ok'", "ok")])
def test_clean_revision(reply, expected):
    assert clean_revision(reply) == expected


@pytest.mark.parametrize("reply", ["", "Revision:", "  \"\"  "])
def test_an_empty_revision_is_a_typed_failure(reply):
    with pytest.raises(JudgeFailure) as info:
        clean_revision(reply)
    assert info.value.kind == "empty_revision"


def test_validation_of_the_ai_feedback_pipelines():
    rule = FeedbackConfig(source="function", function="openrlaif.feedback.rules:brevity")
    validate(Config(pipeline="label", feedback=rule))
    validate(Config(pipeline="online_dpo", feedback=rule))
    validate(Config(pipeline="constitutional"))
    with pytest.raises(ConfigError, match="rollout.samples_per_prompt"):
        validate(Config(pipeline="label", feedback=rule, rollout=RolloutConfig(samples_per_prompt=1)))
    with pytest.raises(ConfigError, match="label.pairs"):
        validate(Config(pipeline="label", feedback=rule, label=LabelConfig(pairs="most")))
    from openrlaif.config import ActorConfig, step_batch_size
    all_pairs = Config(pipeline="online_dpo", feedback=rule, label=LabelConfig(pairs="all"))
    validate(all_pairs)   # 4 samples: room for 6 pairs per prompt, 4 prompts
    assert step_batch_size(all_pairs) == 24
    assert step_batch_size(Config(pipeline="online_dpo", label=LabelConfig(pairs="best_vs_rest"))) == 12
    with pytest.raises(ConfigError, match=r"gets 12 samples per optimizer step.*micro_batch_size=5"):
        validate(Config(pipeline="online_dpo", feedback=rule, label=LabelConfig(pairs="best_vs_rest"),
                        actor=ActorConfig(micro_batch_size=5)))
    with pytest.raises(ConfigError, match="algorithm.loss"):
        from openrlaif.config import AlgorithmConfig
        validate(Config(pipeline="online_dpo", feedback=rule, algorithm=AlgorithmConfig(loss="kto")))
    with pytest.raises(ConfigError, match="follow_policy"):
        validate(Config(pipeline="label", feedback=FeedbackConfig(judge=JudgeConfig(follow_policy=True))))
    with pytest.raises(ConfigError, match="follow_policy"):
        validate(Config(pipeline="online_dpo", feedback=FeedbackConfig(judge=JudgeConfig(
            follow_policy=True, backend="http", base_url="http://127.0.0.1:1/v1", model="m"))))
    with pytest.raises(ConfigError, match="constitution.principles is empty"):
        validate(Config(pipeline="constitutional", constitution=ConstitutionConfig(principles=[])))
    with pytest.raises(ConfigError, match=r"constitution.principles\[0\]"):
        validate(Config(pipeline="constitutional", constitution=ConstitutionConfig(principles=[Principle("x", " ")])))


def test_repeat_ranking_keeps_the_most_consistent_prompts():
    from openrlaif.data.labelling import most_consistent
    w = {0: 0.2, 1: 1.0, 2: 0.6, 3: 0.6, 4: 0.1}
    assert most_consistent(w, 0.5) == {1, 2, 3}        # ceil(0.5 · 5) = 3, ties: the lower id first
    assert most_consistent(w, 0.25) == {1, 2}
    assert most_consistent(w, 0.75) == {1, 2, 3, 0}
    assert most_consistent(w, 1.0) == set(w) and most_consistent({}, 0.5) == set()
    assert most_consistent({0: 0.5, 1: 0.5}, 0.5) == {0}


def test_validation_of_listwise_judging_and_its_filter():
    listwise = FeedbackConfig(judge=JudgeConfig(mode="listwise", readout="generate", max_new_tokens=64))
    validate(Config(pipeline="label", feedback=listwise, label=LabelConfig(keep_top_fraction=0.5)))
    validate(Config(pipeline="online_dpo", feedback=listwise, label=LabelConfig(keep_top_fraction=0.5)))
    validate(Config(pipeline="online_rl", feedback=listwise))
    with pytest.raises(ConfigError, match="readout=generate"):
        validate(Config(pipeline="label", feedback=FeedbackConfig(judge=JudgeConfig(mode="listwise"))))
    with pytest.raises(ConfigError, match="max_new_tokens=64"):
        validate(Config(pipeline="label", feedback=FeedbackConfig(judge=JudgeConfig(mode="listwise",
                                                                                     readout="generate"))))
    with pytest.raises(ConfigError, match="only a listwise judge"):
        validate(Config(pipeline="label", feedback=FeedbackConfig(judge=JudgeConfig(mode="pairwise")),
                        label=LabelConfig(keep_top_fraction=0.5)))
    with pytest.raises(ConfigError, match="label.keep_top_fraction=0.0"):
        validate(Config(pipeline="label", feedback=listwise, label=LabelConfig(keep_top_fraction=0.0)))
    with pytest.raises(ConfigError, match="pipeline=judge_eval judges"):
        validate(Config(pipeline="judge_eval", feedback=listwise))
    with pytest.raises(ConfigError, match="chain_of_thought=true with max_new_tokens=8"):
        validate(Config(pipeline="label", feedback=FeedbackConfig(judge=JudgeConfig(chain_of_thought=True))))
    validate(Config(pipeline="label", feedback=FeedbackConfig(judge=JudgeConfig(chain_of_thought=True,
                                                                                 max_new_tokens=256))))


def test_best_vs_rest_pairs_the_best_with_each_other_response_and_the_batch_has_room_for_them():
    pairs, skipped = select_pairs([0, 0, 0, 0, 1, 1], [0.2, 0.9, 0.5, 0.9, 1.0, 1.0], [True] * 6,
                                  ["a", "b", "c", "d", "e", "f"], "best_vs_rest")
    # group 0: the best is row 1 (0.9, the earlier of the tie), against rows 0 and 2; row 3 ties it
    assert [(p.chosen, p.rejected) for p in pairs] == [(1, 0), (1, 2)]
    assert skipped == {"tie": 2}   # row 3 in group 0, and group 1's only other answer
    batch = Batch({"input_ids": torch.arange(6).unsqueeze(-1), "attention_mask": torch.ones(6, 1),
                   "response_mask": torch.ones(6, 1), "group_ids": torch.tensor([0, 0, 0, 0, 1, 1])})
    pair_batch = pairs_from_rollout(batch, pairs, 2, per_prompt=3)
    assert len(pair_batch) == 6 and pair_batch["pair_mask"].tolist() == [1, 1, 0, 0, 0, 0]
    assert pair_batch["chosen_input_ids"][:2, 0].tolist() == [1, 1]
    assert pair_batch["rejected_input_ids"][:2, 0].tolist() == [0, 2]


def test_best_of_n_keeps_each_prompts_best_answer_above_the_threshold_and_empties_the_rest():
    from openrlaif.batch import prompt_response_layout
    from openrlaif.pipelines.rejection_sampling import best_of_n
    layout = prompt_response_layout([[1, 2], [1, 2], [3], [3]], [[10, 11], [12], [13], [14, 15]], pad_id=0)
    batch = Batch(layout | {"group_ids": torch.tensor([0, 0, 1, 1])})
    examples, kept = best_of_n(batch, [0.2, 0.9, 0.1, 0.3], [True, True, True, False], 2, threshold=None)
    assert examples.meta["prompt_ids"] == [[1, 2], [3]]
    assert examples.meta["response_ids"] == [[12], [13]]     # group 1: the better answer's verdict failed
    assert kept == [0.9, 0.1]
    examples, kept = best_of_n(batch, [0.2, 0.9, 0.1, 0.3], [True, True, True, False], 2, threshold=0.5)
    assert examples.meta["response_ids"] == [[12], []] and kept == [0.9, None]   # no loss, the same row count


def test_rejection_sampling_and_reference_refresh_settings_are_checked():
    from openrlaif.config import AlgorithmConfig, ReferenceConfig
    from openrlaif.roles import role_plan
    rule = FeedbackConfig(source="function", function="openrlaif.feedback.rules:brevity")
    validate(Config(pipeline="rejection_sampling", feedback=rule))
    assert sorted(role_plan(Config(pipeline="rejection_sampling", feedback=rule), None)) == ["actor", "rollout"]
    with pytest.raises(ConfigError, match="best-of-N needs N >= 2"):
        validate(Config(pipeline="rejection_sampling", feedback=rule, rollout=RolloutConfig(samples_per_prompt=1)))
    validate(Config(pipeline="online_dpo", feedback=rule, reference=ReferenceConfig(update_every=2)))
    with pytest.raises(ConfigError, match="pipeline=online_rl keeps its reference"):
        validate(Config(feedback=rule, reference=ReferenceConfig(update_every=2)))
    with pytest.raises(ConfigError, match="algorithm.loss=simpo has none"):
        validate(Config(pipeline="online_dpo", feedback=rule, reference=ReferenceConfig(update_every=2),
                        algorithm=AlgorithmConfig(loss="simpo", beta=2.0)))
