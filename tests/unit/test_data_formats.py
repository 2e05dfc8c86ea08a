"""Data as users bring it: jsonl, parquet (a file or a folder of them), a saved HF dataset folder (a Dataset or a
DatasetDict), data.columns to rename columns, data.overlong for prompts over data.max_prompt_tokens; every error
names the file and the row."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openrlaif.config import Config, ConfigError, DataConfig, validate
from openrlaif.data import load_prompts
from openrlaif.data.pairs import load_pairs
from openrlaif.data.rows import read_rows
from openrlaif.data.sft import load_sft


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


def save_dataset(folder, table: pa.Table) -> str:
    """What `datasets.Dataset.save_to_disk` writes: Arrow IPC stream files listed in state.json."""
    folder.mkdir(parents=True)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}],
                                                   "_split": "train"}))
    (folder / "dataset_info.json").write_text("{}")
    return str(folder)


def test_parquet_prompts_with_a_column_mapping(tmp_path, tokenizer):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"question": ["What is 2+3?", "Name a color."], "answer": ["5", "red"]}), path)
    prompts = load_prompts(str(path), tokenizer, 256, columns={"prompt": "question"})
    assert [p.text for p in prompts] == ["What is 2+3?", "Name a color."]
    assert prompts[0].row["answer"] == "5"   # the other columns stay on the row (environments read them)
    with pytest.raises(ConfigError, match=r"train.parquet:row 1: data.columns maps prompt=query.*has no column "
                                          r"'query'.*\['answer', 'question'\]"):
        load_prompts(str(path), tokenizer, 256, columns={"prompt": "query"})
    with pytest.raises(ConfigError, match=r"train.parquet:row 1: .*prompt"):   # the loader's own check, by row
        load_prompts(str(path), tokenizer, 256)


def test_a_saved_dataset_dict_and_a_folder_of_parquet_files(tmp_path, tokenizer):
    table = pa.table({"prompt": ["Hi?", "Bye?"], "chosen": ["hello", "goodbye"], "rejected": ["no", "nope"]})
    root = tmp_path / "pairs"
    save_dataset(root / "train", table)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    pairs = load_pairs(str(root), tokenizer, 64, 16)
    assert len(pairs) == 2 and tokenizer.decode(pairs[1].chosen_ids).startswith("goodbye")
    (tmp_path / "no_train").mkdir()
    (tmp_path / "no_train" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(ConfigError, match=r"splits \['test'\] and no 'train'.*no_train/test"):
        load_pairs(str(tmp_path / "no_train"), tokenizer, 64, 16)
    shards = tmp_path / "sft"
    shards.mkdir()
    for index, (prompt, response) in enumerate([("a?", "b"), ("c?", "d")]):
        pq.write_table(pa.table({"instruction": [prompt], "response": [response]}), shards / f"part-{index}.parquet")
    batch = load_sft(str(shards), tokenizer, 64, 16, columns={"prompt": "instruction"})
    assert len(batch) == 2
    rows = list(read_rows(str(shards), "data.sft", "rows"))
    assert [where.rsplit("/", 1)[1] for where, _ in rows] == ["part-0.parquet:row 1", "part-1.parquet:row 1"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="a folder without a dataset in it"):
        load_sft(str(tmp_path / "empty"), tokenizer, 64, 16)
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(ConfigError, match="bad.parquet is not a readable parquet file"):
        load_prompts(str(tmp_path / "bad.parquet"), tokenizer, 64)


def test_overlong_prompts_error_filter_or_truncate_left(tmp_path, tokenizer, capsys):
    path = save_dataset(tmp_path / "prompts", pa.table({"prompt": ["short?", " ".join(["word"] * 200)]}))
    with pytest.raises(ConfigError, match=r"prompts/data-00000-of-00001.arrow:row 2: the templated prompt has"):
        load_prompts(path, tokenizer, 64)
    kept = load_prompts(path, tokenizer, 64, overlong="filter")
    assert [p.text for p in kept] == ["short?"]
    assert "1 of 2 prompts were over data.max_prompt_tokens=64: left out" in capsys.readouterr().out
    cut = load_prompts(path, tokenizer, 64, overlong="truncate_left")
    full = load_prompts(path, tokenizer, 10_000)
    assert len(cut) == 2 and len(cut[1].token_ids) == 64 and cut[1].token_ids == full[1].token_ids[-64:]
    with pytest.raises(ConfigError, match="data.overlong=filter left none"):
        load_prompts(save_dataset(tmp_path / "long", pa.table({"prompt": [" ".join(["w"] * 200)]})), tokenizer, 64,
                     overlong="filter")
    with pytest.raises(ConfigError, match="data.overlong"):
        validate(Config(data=DataConfig(overlong="drop")))
