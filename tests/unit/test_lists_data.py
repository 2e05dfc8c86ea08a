"""Unpaired (KTO/BCO) and listwise (LiPO) data: loading, KTO's mismatched rows, batch layout, clear errors."""
import json

import pytest

from openrlaif.config import ConfigError
from openrlaif.data.lists import MISMATCHED, lists_to_batch, load_ranked, load_unpaired


def write(tmp_path, rows):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pairs_become_one_good_and_one_bad_sample_with_mismatched_rows(tiny_tokenizer):
    samples = load_unpaired("demo", tiny_tokenizer, 256, 64, with_mismatched=True)
    assert [s.labels[0] for s in samples[:4]] == [1.0, 0.0, 1.0, 0.0]
    for sample in samples:
        assert len(sample.responses) == 2 and sample.labels[1] == MISMATCHED
    # the mismatched answer belongs to another prompt
    first = samples[0]
    assert first.responses[1] not in (first.responses[0], samples[1].responses[0])


def test_unpaired_rows_and_their_errors(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "a", "completion": "yes", "label": True}, {"prompt": "b", "completion": "no", "label": False}]
    samples = load_unpaired(write(tmp_path, rows), tiny_tokenizer, 256, 64, with_mismatched=False)
    assert [s.labels for s in samples] == [[1.0], [0.0]]
    with pytest.raises(ConfigError, match="label"):
        load_unpaired(write(tmp_path, [{"prompt": "a", "completion": "x", "label": "good"}]), tiny_tokenizer, 256,
                      64, with_mismatched=False)
    with pytest.raises(ConfigError, match="both desirable and undesirable"):
        load_unpaired(write(tmp_path, rows[:1]), tiny_tokenizer, 256, 64, with_mismatched=False)


def test_ranked_lists_load_lay_out_k_rows_per_example_and_check_lengths(tiny_tokenizer, tmp_path):
    examples = load_ranked("demo", tiny_tokenizer, 256, 64)
    assert {len(e.responses) for e in examples} == {3}
    batch = lists_to_batch(examples[:2], tiny_tokenizer.pad_token_id)
    assert len(batch) == 6 and batch["labels"].tolist() == [2, 1, 0, 2, 1, 0]
    assert batch["input_ids"].shape[0] == 6 and batch["ref_logps"].abs().sum() == 0
    bad = [{"prompt": "a", "responses": ["x", "y"], "scores": [1, 0]},
           {"prompt": "b", "responses": ["x", "y", "z"], "scores": [1, 0, 2]}]
    with pytest.raises(ConfigError, match="different lengths"):
        load_ranked(write(tmp_path, bad), tiny_tokenizer, 256, 64)
    with pytest.raises(ConfigError, match="one number per response"):
        load_ranked(write(tmp_path, [{"prompt": "a", "responses": ["x", "y"], "scores": [1]}]), tiny_tokenizer,
                    256, 64)
