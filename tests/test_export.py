"""`dtrain export`: adapters, merged models and consolidated full models load in plain transformers / peft in a
fresh process and give the trained engine's logits; broken adapters are refused; consolidation streams.

The engine logits come from the training processes themselves (tests/adapters/probe_run.py, on 2 ranks under
ZeRO-3); exports are read back by tests/adapters/vanilla_logits.py, which imports nothing of dtrain.
"""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from dtrain.checkpoint_layout import STATE_FILE
from dtrain.config import Config, DatasetConfig, dump_yaml
from dtrain.export import ExportError, export_checkpoint, find_checkpoint, write_sharded
from dtrain.strategies.protocol import ExportOptions
from tests.adapters.runs import STEPS, shared_runs
from tests.helpers import REPO, run_dtrain


def export_cmd(*args: str) -> subprocess.CompletedProcess:
    """`dtrain export ...` through the real CLI, in a fresh process."""
    return run_dtrain("export", *args, timeout=300)


# ---------------------------------------------------------------------------------------------------------------
# No training needed


def test_write_sharded_holds_one_shard_in_memory_at_a_time(tmp_path):
    names = [f"layer.{i}.weight" for i in range(9)]
    live: set[str] = set()
    most_live = 0

    def materialize(name: str) -> torch.Tensor:
        nonlocal most_live
        tensor = torch.full((1000,), float(names.index(name)))  # 4,000 bytes
        live.add(name)
        weakref.finalize(tensor, live.discard, name)
        most_live = max(most_live, len(live))
        return tensor

    files = write_sharded(names, dict.fromkeys(names, 4000), materialize, tmp_path, max_shard_bytes=10_000)
    assert files == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    assert most_live == 2  # two tensors fit under 10 kB: never more than one shard alive
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 36_000 and sorted(index["weight_map"]) == sorted(names)
    for name, file in index["weight_map"].items():
        with safe_open(str(tmp_path / file), "pt") as f:
            assert torch.equal(f.get_tensor(name), torch.full((1000,), float(names.index(name))))


def _fake_checkpoint(root: Path, step: int, complete: bool = True) -> Path:
    folder = root / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / STATE_FILE).write_text("{}")
    return folder


def test_find_checkpoint_newest_by_name_by_number_and_refuses_incomplete(tmp_path):
    two, four = _fake_checkpoint(tmp_path, 2), _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, complete=False)
    (tmp_path / "checkpoints" / ".tmp-step-00000008").mkdir()
    assert find_checkpoint(tmp_path) == four
    assert find_checkpoint(tmp_path / "checkpoints") == four
    assert find_checkpoint(tmp_path, "2") == two == find_checkpoint(tmp_path, "step-00000002")
    assert find_checkpoint(two) == two == find_checkpoint("ignored", str(two))
    with pytest.raises(ExportError, match="step-00000006 is not a complete checkpoint"):
        find_checkpoint(tmp_path, "6")
    with pytest.raises(ExportError, match="no complete checkpoint"):
        find_checkpoint(tmp_path / "elsewhere")


def _adapter_checkpoint(root: Path, tiny_model: Path, module: dict[str, torch.Tensor], strategy="lora") -> Path:
    """A stage-0 checkpoint whose engine state is `module`, as DeepSpeed lays it out."""
    folder = _fake_checkpoint(root, 2)
    cfg = Config(output_dir=str(root), strategy=strategy)
    cfg.model.path = str(tiny_model)
    cfg.data.datasets = [DatasetConfig(path=str(REPO / "data/sample/text.jsonl"))]
    cfg.train.precision, cfg.train.max_steps, cfg.train.gradient_accumulation_steps = "fp32", 2, 1
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    (folder / "ds").mkdir()
    state = {"module": module, "buffer_names": [], "shared_params": {}}
    torch.save(state, folder / "ds" / "mp_rank_00_model_states.pt")
    return folder


def _expected(tiny_model: Path) -> dict[str, tuple[int, ...]]:
    from dtrain.strategies.peft_adapters import expected_adapter_shapes

    cfg = Config(strategy="lora")
    cfg.model.path = str(tiny_model)
    return expected_adapter_shapes(cfg)


def test_an_adapter_with_empty_tensors_is_refused_and_nothing_written(tmp_path, tiny_model):
    """What an ungathered ZeRO-3 save looks like: every adapter tensor [0]-shaped."""
    expected = _expected(tiny_model)
    checkpoint = _adapter_checkpoint(tmp_path, tiny_model, {name: torch.empty(0) for name in expected})
    with pytest.raises(ExportError, match="refusing to write a broken adapter") as error:
        export_checkpoint(checkpoint, {"adapter": tmp_path / "out"}, ExportOptions())
    assert str(error.value).count("empty tensor (0,)") == 16
    assert not (tmp_path / "out").exists()


def test_an_adapter_with_misshaped_or_missing_tensors_is_refused(tmp_path, tiny_model):
    expected = _expected(tiny_model)
    module = {name: torch.ones(shape) for name, shape in expected.items()}
    first, second = list(expected)[:2]
    module[first] = module[first].T.contiguous()  # lora_A (16, 64) saved as (64, 16)
    del module[second]
    checkpoint = _adapter_checkpoint(tmp_path, tiny_model, module)
    with pytest.raises(ExportError) as error:
        export_checkpoint(checkpoint, {"merged": tmp_path / "out"}, ExportOptions())
    assert f"{first}: shape (64, 16), expected (16, 64)" in str(error.value)
    assert f"{second}: missing from the checkpoint" in str(error.value)


def test_each_export_refuses_the_other_strategy(tmp_path, tiny_model):
    lora = _adapter_checkpoint(tmp_path / "a", tiny_model, {})
    with pytest.raises(ExportError, match="--hf is not for strategy lora; this run exports --adapter, --merged"):
        export_checkpoint(lora, {"hf": tmp_path / "out"}, ExportOptions())
    full = _adapter_checkpoint(tmp_path / "b", tiny_model, {}, strategy="full")
    with pytest.raises(ExportError, match="--adapter is not for strategy full; this run exports --hf"):
        export_checkpoint(full, {"adapter": tmp_path / "out"}, ExportOptions())
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# From real 2-rank ZeRO-3 runs (slow: the tests below all wait for `exported`)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model):
    """Exports of the lora, qlora and full ZeRO-3 runs, and every export's logits read back by plain libraries in
    one fresh process: {"engine": {run: logits}, "vanilla": {spec: logits}, "dirs": ..., "outputs": ...}."""
    runs = shared_runs(tmp_path_factory, tiny_model)
    out = tmp_path_factory.mktemp("exports")
    outputs = {
        "lora": export_cmd(
            str(runs.run("lora-z3")), "--adapter", str(out / "lora-adapter"), "--merged", str(out / "lora-merged")
        ).stdout,
        "full": export_cmd(
            str(runs.run("full-z3")),
            "--checkpoint",
            str(STEPS),
            "--hf",
            str(out / "full-hf"),
            "--max-shard-size",
            "200KB",
        ).stdout,  # fmt: skip
        "full-bf16": export_cmd(str(runs.run("full-z3")), "--hf", str(out / "full-bf16"), "--dtype", "bf16").stdout,
    }
    # In this process too: the same functions the command calls.
    qlora_ckpt = find_checkpoint(runs.run("qlora-z3"))
    export_checkpoint(qlora_ckpt, {"adapter": out / "qlora-adapter", "merged": out / "qlora-merged"}, ExportOptions())
    specs = {
        "lora-adapter": f"adapter:{tiny_model}:{out / 'lora-adapter'}",
        "lora-merged": f"hf:{out / 'lora-merged'}",
        "base": f"hf:{tiny_model}",
        "qlora-adapter": f"adapter4bit:{tiny_model}:{out / 'qlora-adapter'}",
        "qlora-merged": f"hf:{out / 'qlora-merged'}",
        "base-4bit": f"hf4bit:{tiny_model}",
        "full-hf": f"hf:{out / 'full-hf'}",
        "full-bf16": f"hf:{out / 'full-bf16'}",
    }
    engine = {name: torch.load(runs.probe(f"{name}-z3") / "logits.pt") for name in ("lora", "qlora", "full")}
    assert all(torch.equal(e["input_ids"], engine["lora"]["input_ids"]) for e in engine.values())
    cmd = [sys.executable, "-m", "tests.adapters.vanilla_logits", str(runs.probe("lora-z3") / "logits.pt")]
    proc = subprocess.run([*cmd, str(out / "vanilla.pt"), *specs.values()], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
    vanilla = torch.load(out / "vanilla.pt")
    return {
        "engine": {k: v["logits"] for k, v in engine.items()},
        "vanilla": {name: vanilla[spec] for name, spec in specs.items()},
        "dirs": out,
        "outputs": outputs,
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.slow
def test_lora_adapter_loads_with_peft_from_pretrained_and_matches_the_engine(exported):
    engine, vanilla = exported["engine"]["lora"], exported["vanilla"]
    files = {p.name for p in (exported["dirs"] / "lora-adapter").iterdir()}
    # the adapter, and the tokenizer with the chat template training used
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    torch.testing.assert_close(vanilla["lora-adapter"], engine, rtol=0, atol=1e-5)
    assert rel(vanilla["base"], engine) > 0.01  # the adapter matters: the check above could not pass without it


@pytest.mark.slow
def test_lora_merged_loads_with_auto_model_and_matches_the_adapter_model(exported):
    vanilla = exported["vanilla"]
    torch.testing.assert_close(vanilla["lora-merged"], vanilla["lora-adapter"], rtol=0, atol=1e-5)
    files = {p.name for p in (exported["dirs"] / "lora-merged").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files


@pytest.mark.slow
def test_qlora_adapter_on_the_4bit_base_matches_the_engine(exported):
    """bf16 compute: the engine (training kernels) and a vanilla 4-bit model (bitsandbytes' inference kernels)
    round differently, ~0.3 %; the adapter moves the logits by far more."""
    engine, vanilla = exported["engine"]["qlora"], exported["vanilla"]
    assert rel(vanilla["qlora-adapter"], engine) < 0.01
    assert (vanilla["qlora-adapter"].argmax(-1) == engine.argmax(-1)).float().mean() >= 0.98
    assert rel(vanilla["base-4bit"], engine) > 0.05


@pytest.mark.slow
def test_qlora_merged_onto_the_dequantized_base_matches_the_adapter_model(exported):
    vanilla = exported["vanilla"]
    assert rel(vanilla["qlora-merged"], vanilla["qlora-adapter"]) < 0.01
    assert (vanilla["qlora-merged"].argmax(-1) == vanilla["qlora-adapter"].argmax(-1)).float().mean() >= 0.98
    config = json.loads((exported["dirs"] / "qlora-merged" / "config.json").read_text())
    assert "quantization_config" not in config  # a plain model: loads without bitsandbytes


@pytest.mark.slow
def test_full_hf_export_is_sharded_and_matches_the_engine(exported):
    out = exported["dirs"] / "full-hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).stat().st_size < 300_000 for s in shards)
    assert "peak RSS" in exported["outputs"]["full"] and f"step-{STEPS:08d}" in exported["outputs"]["full"]
    torch.testing.assert_close(exported["vanilla"]["full-hf"], exported["engine"]["full"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_full_bf16_export_casts_parameters_only(exported):
    out = exported["dirs"] / "full-bf16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert rel(exported["vanilla"]["full-bf16"], exported["engine"]["full"]) < 0.02
