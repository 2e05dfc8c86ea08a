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
