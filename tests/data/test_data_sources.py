"""Every source kind `datasets` reads gives the same samples as the same rows in one .jsonl file.

Cost (2-core CI machine): building each source and preparing it is 0.2-0.6 s; the whole module runs in ~10 s.
"""

from __future__ import annotations

import json

import pytest

from dtrain.config import DatasetConfig
from dtrain.data import DataError, prepare_data
from dtrain.data.cache import cache_key
from dtrain.tiny import SAMPLE_DIR
from tests.hub_cache import add_to_hub_cache

ROWS = [json.loads(line) for line in (SAMPLE_DIR / "text.jsonl").read_text().splitlines()[:40]]


def write_jsonl(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def source(path, **fields) -> DatasetConfig:
    return DatasetConfig(path=str(path), format="text", **fields)


def rows_of(make_cfg, tokenizer, ds) -> list[tuple[int, ...]]:
    samples = prepare_data(make_cfg(ds, seq_len=128), tokenizer, rank=0, world_size=1).train
    return [tuple(samples[i]["input_ids"]) for i in range(len(samples))]


@pytest.fixture
def reference(tmp_path, make_cfg, tokenizer):
    write_jsonl(tmp_path / "all.jsonl", ROWS)
    return rows_of(make_cfg, tokenizer, source(tmp_path / "all.jsonl"))


def test_globs_of_every_file_type(tmp_path, make_cfg, tokenizer, reference):
    import datasets
    import pyarrow as pa

    halves = ROWS[:20], ROWS[20:]
    for i, part in enumerate(halves):
        write_jsonl(tmp_path / "jsonl" / f"part-{i}.jsonl", part)
        table = datasets.Dataset.from_list(part)
        table.to_parquet(str(tmp_path / "parquet" / f"part-{i}.parquet"))
        table.to_csv(str(tmp_path / "csv" / f"part-{i}.csv"), index=False)
        (tmp_path / "arrow").mkdir(exist_ok=True)
        with pa.ipc.new_stream(str(tmp_path / "arrow" / f"part-{i}.arrow"), table.data.schema) as writer:
            writer.write_table(table.data.table)
    for kind in ("jsonl", "parquet", "csv", "arrow"):
        assert rows_of(make_cfg, tokenizer, source(tmp_path / kind / f"part-*.{kind}")) == reference, kind
    assert rows_of(make_cfg, tokenizer, source(tmp_path / "arrow" / "part-1.arrow"))  # a single .arrow file too


def test_local_folder_and_save_to_disk_folders(tmp_path, make_cfg, tokenizer, reference):
    import datasets

    write_jsonl(tmp_path / "folder" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "folder" / "test.jsonl", ROWS[:3])
    assert rows_of(make_cfg, tokenizer, source(tmp_path / "folder")) == reference
    assert rows_of(make_cfg, tokenizer, source(tmp_path / "folder", split="test")) != reference
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    assert rows_of(make_cfg, tokenizer, source(tmp_path / "saved")) == reference
    splits = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS[:3]), sft=datasets.Dataset.from_list(ROWS))
    splits.save_to_disk(str(tmp_path / "saved_dict"))
    assert rows_of(make_cfg, tokenizer, source(tmp_path / "saved_dict", split="sft")) == reference


README = """---
configs:
- config_name: default
  data_files:
  - split: train_sft
    path: data/train-*.jsonl
- config_name: first_half
  data_files:
  - split: train_sft
    path: data/train-0.jsonl
---
"""


def test_hub_dataset_from_the_local_cache_with_name_split_revision_data_files(
    tmp_path, private_hf_caches, make_cfg, tokenizer, reference
):
    repo = tmp_path / "repo"
    write_jsonl(repo / "data" / "train-0.jsonl", ROWS[:20])
    (repo / "README.md").write_text(README)
    old = add_to_hub_cache(private_hf_caches, "acme/chats", repo, "dataset", revision="v1")
    write_jsonl(repo / "data" / "train-1.jsonl", ROWS[20:])
    new = add_to_hub_cache(private_hf_caches, "acme/chats", repo, "dataset")
    hub = source("acme/chats", split="train_sft")
    assert rows_of(make_cfg, tokenizer, hub) == reference
    first_half = rows_of(make_cfg, tokenizer, source("acme/chats", split="train_sft", name="first_half"))
    assert first_half == rows_of(make_cfg, tokenizer, source("acme/chats", split="train_sft", revision="v1"))
    assert first_half != reference
    only_second = source("acme/chats", split="train", data_files="data/train-1.jsonl")
    assert rows_of(make_cfg, tokenizer, only_second) != reference
    # The resolved commit keys the cache: the same repo id at another revision is other data.
    assert old != new
    assert cache_key(make_cfg(hub), tokenizer) != cache_key(make_cfg(source("acme/chats", revision="v1")), tokenizer)


def test_missing_hub_dataset_is_one_line_saying_how_to_download(make_cfg, tokenizer):
    with pytest.raises(DataError) as error:
        prepare_data(make_cfg(source("acme/absent", revision="v2")), tokenizer, rank=0, world_size=1)
    message = str(error.value)
    assert "\n" not in message and "`hf download acme/absent --repo-type dataset --revision v2`" in message


def test_bad_row_of_a_datasets_source_names_dataset_split_and_row_index(tmp_path, make_cfg, tokenizer):
    write_jsonl(tmp_path / "parts" / "part-0.jsonl", [*ROWS[:2], {"text": ""}])
    with pytest.raises(DataError, match=r"parts/part-\*\.jsonl \(split train\) row index 2: field 'text' is empty"):
        prepare_data(make_cfg(source(tmp_path / "parts" / "part-*.jsonl")), tokenizer, rank=0, world_size=1)


def test_folder_cache_key_follows_contents(tmp_path, make_cfg, tokenizer):
    write_jsonl(tmp_path / "folder" / "train.jsonl", ROWS)
    before = cache_key(make_cfg(source(tmp_path / "folder")), tokenizer)
    write_jsonl(tmp_path / "folder" / "train.jsonl", ROWS[1:])
    assert cache_key(make_cfg(source(tmp_path / "folder")), tokenizer) != before
