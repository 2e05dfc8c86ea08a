import json

import pytest

from openrlaif.config import ConfigError
from openrlaif.data.pairs import both_sides, load_pairs, pairs_to_batch


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


def write(tmp_path, rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_string_and_conversational_rows_share_one_layout(tmp_path, tokenizer):
    path = write(tmp_path, [
        {"prompt": "say yes", "chosen": "yes", "rejected": "no no"},
        {"chosen": [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "user", "content": "say yes"}, {"role": "assistant", "content": "no no"}]},
    ])
    first, second = load_pairs(path, tokenizer, 128, 32)
    assert first == second
    assert tokenizer.decode(first.chosen_ids) == "yes<|im_end|>"
    assert tokenizer.decode(first.prompt_ids).endswith("<|im_start|>assistant\n")
    batch = pairs_to_batch([first, second], tokenizer.pad_token_id)
    width = batch["chosen_input_ids"].shape[1]
    assert batch["rejected_input_ids"].shape[1] == width
    assert batch["chosen_response_mask"].sum(1).tolist() == [len(first.chosen_ids)] * 2
    sides = both_sides(batch)
    assert len(sides) == 4 and sides["response_mask"].sum(1).tolist()[2:] == [len(first.rejected_ids)] * 2


@pytest.mark.parametrize("rows,message", [
    (['{"prompt": "x", "chosen": "a"}'], "needs \"chosen\" and \"rejected\""),
    (['{"prompt": "x", "chosen": "a", "rejected": ""}'], "non-empty strings"),
    (['not json'], ":1: not valid JSON"),
    ([{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
       "rejected": [{"role": "user", "content": "OTHER"}, {"role": "assistant", "content": "c"}]}], "same prompt"),
    ([{"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "a"}]}],
     "ending with the assistant's answer"),
    ([""], "holds no pairs"),
])
def test_bad_pair_files_name_the_problem(tmp_path, tokenizer, rows, message):
    with pytest.raises(ConfigError, match=message):
        load_pairs(write(tmp_path, rows), tokenizer, 128, 32)


def test_missing_pairs_file(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="data.pairs=.*no such file"):
        load_pairs(str(tmp_path / "none.jsonl"), tokenizer, 128, 32)


def test_demo_pairs_load(tokenizer):
    assert len(load_pairs("demo", tokenizer, 256, 64)) >= 12


def test_pairs_whose_answers_are_the_same_are_skipped_with_a_warning(tmp_path, tokenizer, capsys):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "a"}, {"prompt": "q", "chosen": "a", "rejected": "b"}]
    pairs = load_pairs(write(tmp_path, rows), tokenizer, 256, 256)
    assert len(pairs) == 1
    assert "skipped 1 pair(s) whose chosen and rejected answers are the same (line(s) 1)" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="holds no pairs"):
        load_pairs(write(tmp_path, rows[:1]), tokenizer, 256, 256)
