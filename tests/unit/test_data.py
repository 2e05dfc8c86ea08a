import json

import pytest

from openrlaif.config import ConfigError
from openrlaif.data import DEMO_PROMPTS, PromptStream, load_prompts


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


def write(tmp_path, lines):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_demo_file_loads_with_chat_template(tokenizer):
    prompts = load_prompts("demo", tokenizer, 256)
    assert len(prompts) >= 16
    assert prompts[0].text == json.loads(open(DEMO_PROMPTS).readline())["prompt"]
    decoded = tokenizer.decode(prompts[0].token_ids)
    assert decoded.startswith("<|im_start|>user\n") and decoded.endswith("<|im_start|>assistant\n")


def test_messages_rows_and_system_prompt(tmp_path, tokenizer):
    path = write(tmp_path, [json.dumps({"messages": [{"role": "user", "content": "hi"}]}), json.dumps({"prompt": "yo"})])
    prompts = load_prompts(path, tokenizer, 256, system_prompt="Be brief.")
    assert [p.text for p in prompts] == ["hi", "yo"]
    assert "<|im_start|>system\nBe brief." in tokenizer.decode(prompts[0].token_ids)


@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "ok"}', '{"prompt": "broken"'], ":2: not valid JSON"),
    (['{"text": "wrong key"}'], ":1: each row must be an object"),
    (['{"prompt": ""}'], "non-empty string"),
    (['{"messages": [{"role": "assistant", "content": "x"}]}'], "last message must come from the user"),
    ([""], "holds no prompts"),
])
def test_bad_prompt_files_name_the_line_and_fix(tmp_path, tokenizer, lines, message):
    with pytest.raises(ConfigError, match=message):
        load_prompts(write(tmp_path, lines), tokenizer, 256)


def test_missing_file_and_overlong_prompt(tmp_path, tokenizer):
    with pytest.raises(ConfigError, match="no such file"):
        load_prompts(str(tmp_path / "nope.jsonl"), tokenizer, 256)
    with pytest.raises(ConfigError, match="max_prompt_tokens"):
        load_prompts(write(tmp_path, [json.dumps({"prompt": "word " * 300})]), tokenizer, 64)


def test_prompt_stream_covers_each_epoch_and_is_seeded(tokenizer):
    prompts = load_prompts("demo", tokenizer, 256)
    stream = PromptStream(prompts, batch_size=len(prompts), seed=3)
    first_epoch = [p.text for p in stream.next_batch()]
    assert sorted(first_epoch) == sorted(p.text for p in prompts)
    again = PromptStream(prompts, batch_size=len(prompts), seed=3)
    assert [p.text for p in again.next_batch()] == first_epoch


def test_a_byte_order_mark_is_accepted_and_non_utf8_names_the_line(tmp_path, tokenizer):
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "hi"}).encode() + b"\n")
    assert [p.text for p in load_prompts(str(bom), tokenizer, 256)] == ["hi"]
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(json.dumps({"prompt": "ok"}).encode() + b'\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ConfigError, match=r"latin.jsonl:2: not UTF-8 \(byte 16 of the line is 0xe9\)"):
        load_prompts(str(latin), tokenizer, 256)
