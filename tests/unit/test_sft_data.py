import json

import pytest
import torch
import torch.nn.functional as F

from openrlaif.config import ConfigError
from openrlaif.data.sft import block_causal_mask, load_sft, pack_examples


def test_unpacked_layout_masks_the_prompt_out_of_the_loss():
    out = pack_examples([[5, 6, 7]], [[8, 9]], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    # logits at t predict t+1: positions 2 and 3 predict the answer tokens 8 and 9
    assert out["loss_mask"].tolist() == [[0.0, 0.0, 1.0, 1.0, 0.0]]


def test_packing_restarts_positions_and_separates_segments():
    out = pack_examples([[5, 6], [7], [8, 8, 8, 8]], [[1], [2, 3], [4]], pad_id=0, pack_length=6)
    assert out["input_ids"].shape[0] == 2                       # examples 0 and 1 share a row
    assert out["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2]
    assert out["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 2]
    assert out["segment_ids"][1].tolist() == [1, 1, 1, 1, 1, 0]
    assert out["loss_mask"].sum().item() == 4                   # one label per answer token


def test_block_causal_mask_blocks_other_examples_and_future():
    mask = block_causal_mask(torch.tensor([[1, 1, 2, 2, 0]]))[0, 0]
    assert mask[1].tolist() == [True, True, False, False, False]
    assert mask[3].tolist() == [False, False, True, True, False]
    assert mask[4].tolist() == [False, False, False, False, True]   # padding sees only itself: no NaN rows


def answer_loss(model, packed):
    logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"],
                   attention_mask=block_causal_mask(packed["segment_ids"])).logits[:, :-1]
    token_loss = F.cross_entropy(logits.transpose(1, 2), packed["input_ids"][:, 1:], reduction="none")
    return (token_loss * packed["loss_mask"][:, :-1]).sum()


def test_packed_and_unpacked_losses_are_identical(tiny_model):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompts, answers = [[5, 6, 7, 8], [9, 10], [11, 12, 13]], [[20, 21], [22, 23, 24], [25]]
    with torch.no_grad():
        unpacked = answer_loss(model, pack_examples(prompts, answers, pad_id=3))
        packed_layout = pack_examples(prompts, answers, pad_id=3, pack_length=64)
        assert packed_layout["input_ids"].shape[0] == 1
        packed = answer_loss(model, packed_layout)
    assert torch.allclose(packed, unpacked, atol=1e-4)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


def test_loading_prompt_response_and_messages(tmp_path, tokenizer):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    examples = load_sft(str(path), tokenizer, 128, 32)
    assert examples.meta["prompt_ids"][0] == examples.meta["prompt_ids"][1]
    assert tokenizer.decode(examples.meta["response_ids"][0]) == "hello<|im_end|>"
    assert len(load_sft("demo", tokenizer, 256, 64)) >= 8


@pytest.mark.parametrize("line,message", [('{"prompt": "x"}', "needs non-empty"), ("nope", ":1: not valid JSON"),
                                          ('{"messages": [{"role": "user", "content": "x"}]}', "assistant's answer")])
def test_bad_sft_rows(tmp_path, tokenizer, line, message):
    path = tmp_path / "sft.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        load_sft(str(path), tokenizer, 128, 32)
