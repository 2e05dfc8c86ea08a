import pytest
import torch

from openrlaif.batch import Batch
from openrlaif.rollout.collate import completions_to_batch
from openrlaif.rollout.types import Completion


def make_batch(n=5):
    return Batch({"x": torch.arange(n), "y": torch.arange(2 * n).view(n, 2)}, {"text": [f"s{i}" for i in range(n)]})


def test_split_then_concat_round_trips():
    batch = make_batch(5)
    parts = batch.split(2)
    assert [len(p) for p in parts] == [2, 3] or [len(p) for p in parts] == [3, 2]
    joined = Batch.concat(parts)
    assert torch.equal(joined["x"], batch["x"]) and joined.meta["text"] == batch.meta["text"]


def test_chunks_of_and_select():
    batch = make_batch(5)
    assert [len(c) for c in batch.chunks_of(2)] == [2, 2, 1]
    picked = batch.select([4, 0])
    assert picked["x"].tolist() == [4, 0] and picked.meta["text"] == ["s4", "s0"]


def test_fields_must_agree_on_batch_size():
    with pytest.raises(ValueError, match="disagree"):
        Batch({"x": torch.zeros(3)}, {"text": ["a"]})
    batch = make_batch(3)
    with pytest.raises(ValueError, match="rows"):
        batch["z"] = torch.zeros(4)


def test_completions_to_batch_pads_prompt_left_and_response_right():
    prompts = [[5, 6, 7], [8]]
    completions = [Completion(0, [1, 2], [-0.1, -0.2], True), Completion(1, [3], [-0.3], False)]
    batch = completions_to_batch(prompts, ["p0", "p1"], completions, ["r0", "r1"], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 2], [0, 0, 8, 3, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 0]]
    assert batch["response_mask"].tolist() == [[1.0, 1.0], [1.0, 0.0]]
    assert torch.allclose(batch["rollout_logprobs"], torch.tensor([[-0.1, -0.2], [-0.3, 0.0]]))
    assert batch["group_ids"].tolist() == [0, 1] and batch.meta["prompt"] == ["p0", "p1"]


def test_concat_rollouts_repads_batches_of_different_widths():
    """Dynamic sampling joins rollout batches sampled apart: each keeps its tokens where the layout says."""
    import torch

    from openrlaif.batch import concat_rollouts, prompt_response_layout
    first = Batch(prompt_response_layout([[5, 6]], [[7, 8, 9]], pad_id=0) | {"group_ids": torch.tensor([0])},
                  {"prompt": ["a"]})
    first["rollout_logprobs"] = torch.tensor([[-1.0, -2.0, -3.0]])
    second = Batch(prompt_response_layout([[1, 2, 3, 4]], [[10]], pad_id=0) | {"group_ids": torch.tensor([1])},
                   {"prompt": ["b"]})
    second["rollout_logprobs"] = torch.tensor([[-4.0]])
    merged = concat_rollouts([first, second], pad_id=0)
    assert merged["input_ids"].tolist() == [[0, 0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 10, 0, 0]]
    assert merged["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]
    assert merged["response_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert merged["rollout_logprobs"].tolist() == [[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]]
    assert merged["group_ids"].tolist() == [0, 1] and merged.meta["prompt"] == ["a", "b"]


def test_informative_groups_are_those_whose_valid_rewards_differ():
    import torch

    from openrlaif.feedback import FeedbackResult
    from openrlaif.pipelines.online_rl import informative_groups
    batch = Batch({"group_ids": torch.tensor([0, 0, 1, 1, 2, 2])})
    result = FeedbackResult(torch.tensor([1.0, 0.0, 0.5, 0.5, 1.0, 0.0]),
                            torch.tensor([True, True, True, True, True, False]))
    assert informative_groups(batch, result) == [0]   # group 1 all equal; group 2 has one valid sample
