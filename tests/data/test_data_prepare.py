"""prepare_data end to end: cache reuse and keys, one writer with waiting ranks, eval split, mixture, file types."""

from __future__ import annotations

import contextlib
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from dtrain.config import DatasetConfig
from dtrain.data import DataError, parallel, prepare_command, prepare_data
from dtrain.data.cache import cache_key
from dtrain.tiny import SAMPLE_DIR

TEXT, INSTRUCTION, CHAT = SAMPLE_DIR / "text.jsonl", SAMPLE_DIR / "instruction.jsonl", SAMPLE_DIR / "chat.jsonl"


def _rows(samples) -> list[tuple[int, ...]]:
    return [tuple(samples[i]["input_ids"]) for i in range(len(samples))]


def _documents(samples) -> set[tuple[int, ...]]:
    docs = set()
    for i in range(len(samples)):
        ids, pos = samples[i]["input_ids"], samples[i]["position_ids"]
        starts = [j for j, p in enumerate(pos) if p == 0] + [len(ids)]
        docs |= {tuple(ids[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)}
    return docs


def test_second_run_reuses_the_cache_and_keys_follow_content_not_path(tmp_path, make_cfg, tokenizer):
    cfg = make_cfg((TEXT, "text"), seq_len=128)
    first = prepare_data(cfg, tokenizer, rank=0, world_size=1)
    second = prepare_data(cfg, tokenizer, rank=0, world_size=1)
    assert not first.report.cache_hit and second.report.cache_hit
    assert _rows(first.train) == _rows(second.train)
    assert isinstance(second.train.input_ids, np.memmap)
    copy = tmp_path / "elsewhere.jsonl"
    shutil.copy(TEXT, copy)
    assert cache_key(make_cfg((copy, "text"), seq_len=128), tokenizer) == cache_key(cfg, tokenizer)
    assert cache_key(make_cfg((TEXT, "text"), seq_len=256), tokenizer) != cache_key(cfg, tokenizer)
    with open(copy, "a") as f:
        f.write(json.dumps({"text": "one more row"}) + "\n")
    assert cache_key(make_cfg((copy, "text"), seq_len=128), tokenizer) != cache_key(cfg, tokenizer)
    leftovers = [p.name for p in (tmp_path / ".dtrain-cache").iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_other_ranks_wait_for_rank_0_then_load_the_same_data(make_cfg, tokenizer):
    cfg = make_cfg((CHAT, "chat"))
    results = {}
    waiter = threading.Thread(target=lambda: results.update(r1=prepare_data(cfg, tokenizer, rank=1, world_size=2)))
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive()  # nothing to load yet: rank 1 polls, it does not prepare
    results["r0"] = prepare_data(cfg, tokenizer, rank=0, world_size=2)
    waiter.join(timeout=30)
    assert _rows(results["r1"].train) == _rows(results["r0"].train)


def test_rank_0_failure_reaches_the_waiting_ranks(tmp_path, make_cfg, tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    cfg = make_cfg((bad, "text"))
    errors = []

    def wait():
        try:
            prepare_data(cfg, tokenizer, rank=1, world_size=2)
        except DataError as e:
            errors.append(str(e))

    waiter = threading.Thread(target=wait)
    waiter.start()
    with pytest.raises(DataError, match="malformed JSON"):
        prepare_data(cfg, tokenizer, rank=0, world_size=2)
    waiter.join(timeout=30)
    assert errors and "rank 0 failed to prepare" in errors[0] and "malformed JSON" in errors[0]


def test_eval_fraction_holds_out_seeded_disjoint_examples(make_cfg, tokenizer):
    prepared = prepare_data(make_cfg((TEXT, "text"), eval_fraction=0.1, seed=1), tokenizer, rank=0, world_size=1)
    assert prepared.report.eval.examples == 40 and prepared.report.train.examples == 360
    assert not _documents(prepared.train) & _documents(prepared.eval)
    again = prepare_data(make_cfg((TEXT, "text"), eval_fraction=0.1, seed=1), tokenizer, rank=0, world_size=1)
    assert _documents(again.eval) == _documents(prepared.eval)
    other = prepare_data(make_cfg((TEXT, "text"), eval_fraction=0.1, seed=2), tokenizer, rank=0, world_size=1)
    assert _documents(other.eval) != _documents(prepared.eval)


def test_separate_eval_dataset(make_cfg, tokenizer):
    cfg = make_cfg((CHAT, "chat"), eval_datasets=[(SAMPLE_DIR / "instruction.jsonl", "instruction")])
    report = prepare_data(cfg, tokenizer, rank=0, world_size=1).report
    assert report.train.examples == 300 and report.eval.examples == 200
    assert "eval dataset" in str(report)


def test_mixture_weights_set_each_datasets_share(make_cfg, tokenizer):
    text, instruction = (
        DatasetConfig(path=str(TEXT), weight=1.0),
        DatasetConfig(path=str(INSTRUCTION), format="instruction", weight=3.0),
    )
    prepared = prepare_data(make_cfg(text, instruction, seed=0), tokenizer, rank=0, world_size=1)
    report = prepared.report
    assert [d.train_examples for d in report.datasets] == [150, 450]  # 600 examples in all, split 1 : 3
    assert report.train.examples == 600
    assert "450 in training (weight 3)" in str(report)


def test_label_counts_and_positions_are_consistent(make_cfg, tokenizer):
    for packing in (True, False):
        samples = prepare_data(make_cfg((CHAT, "chat"), packing=packing), tokenizer, rank=0, world_size=1).train
        assert len(samples) > 0
        for i in range(len(samples)):
            row = samples[i]
            assert samples.num_label_tokens(i) == sum(label != -100 for label in row["labels"][1:])
            assert row["position_ids"][0] == 0 and len(row["input_ids"]) <= 512
            # Labels never cross a boundary: a document's first token is never a target.
            assert all(label == -100 for p, label in zip(row["position_ids"], row["labels"], strict=True) if p == 0)


@pytest.mark.parametrize(("overlong", "kept"), [("truncate", 400), ("drop", 400 - 48), ("split", 400 + 48)])
def test_overlong_rows_are_truncated_dropped_or_split_and_counted(make_cfg, tokenizer, overlong, kept):
    report = prepare_data(make_cfg((TEXT, "text"), overlong=overlong), tokenizer, rank=0, world_size=1).report
    counted = {"truncate": report.truncated, "drop": report.dropped.get("longer than seq_len", 0)}
    assert counted.get(overlong, report.datasets[0].split) == 48
    assert report.examples >= kept if overlong == "split" else report.examples == kept


def test_parquet_csv_and_json_give_the_same_samples_as_jsonl(tmp_path, make_cfg, tokenizer):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet

    rows = [json.loads(line) for line in TEXT.read_text().splitlines()[:50]]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "t.json").write_text(json.dumps(rows))
    table = pa.Table.from_pylist(rows)
    pyarrow.parquet.write_table(table, tmp_path / "t.parquet")
    pyarrow.csv.write_csv(table, tmp_path / "t.csv")
    reference = _rows(prepare_data(make_cfg((tmp_path / "t.jsonl", "text")), tokenizer, rank=0, world_size=1).train)
    for suffix in ("json", "parquet", "csv"):
        prepared = prepare_data(make_cfg((tmp_path / f"t.{suffix}", "text")), tokenizer, rank=0, world_size=1)
        assert _rows(prepared.train) == reference, suffix


def test_prepare_command_prints_the_counts(make_cfg):
    text = prepare_command(make_cfg((INSTRUCTION, "instruction"), eval_fraction=0.05))
    for expected in ("200 rows -> 200 examples", "10 held out", "packed blocks", "fill ratio", "truncated 0"):
        assert expected in text


@pytest.mark.parametrize("in_rank", [False, True], ids=["prepare", "in-a-rank"])
def test_parallel_tokenization_gives_the_same_samples_and_report(tmp_path, make_cfg, tokenizer, in_rank, monkeypatch):
    """Forked workers (dtrain prepare), or inside a rank (a gloo process group and its threads) workers started by a
    forkserver, after the first rows in the calling process: the samples and the report of one process either way."""
    monkeypatch.setattr(parallel, "SERIAL_ROWS", 100)
    mixed = tmp_path / "mixed.jsonl"
    lines = CHAT.read_text().splitlines()
    mixed.write_text("\n".join(lines[:150] + ["not json", '{"messages": []}'] + lines[150:]) + "\n")
    prepared = {}
    for num_proc in (1, 2):
        cache = str(tmp_path / f"c{num_proc}")
        cfg = make_cfg((mixed, "chat"), (TEXT, "text"), on_bad_row="skip", cache_dir=cache, num_proc=num_proc)
        with process_group(tmp_path / "store") if in_rank else contextlib.nullcontext():
            prepared[num_proc] = prepare_data(cfg, tokenizer, rank=0, world_size=1)
    one, two = prepared[1], prepared[2]
    for name in ("input_ids", "labels", "position_ids", "offsets"):
        assert np.array_equal(getattr(one.train, name), getattr(two.train, name)), name
    assert one.report.datasets == two.report.datasets and one.report.skipped == {
        "malformed JSON": 1,
        "empty conversation": 1,
    }


@contextlib.contextmanager
def process_group(store: Path):
    dist.init_process_group("gloo", store=dist.FileStore(str(store), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
