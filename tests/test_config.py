"""Config: every shipped YAML passes `dtrain check`; bad configs fail naming the key, before any process starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from dtrain_launch.cli import main

from dtrain.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml"))


@pytest.fixture
def base(tmp_path, tiny_model) -> dict:
    raw = yaml.safe_load((REPO / "configs/tiny-full-zero3.yaml").read_text())
    raw["model"]["path"] = str(tiny_model)
    raw["data"]["datasets"][0]["path"] = str(REPO / "data/sample/text.jsonl")
    raw["output_dir"] = str(tmp_path / "run")
    return raw


def write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_pass_check(path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    if "tiny" in path.name and not (REPO / "runs/tiny-model/config.json").exists():
        main(["tiny-model", "runs/tiny-model"])
    assert main(["check", str(path.relative_to(REPO))]) == 0, capsys.readouterr().err
    assert "OK" in capsys.readouterr().out


def _set(raw: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    node = raw
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value


BAD = [
    ("model.colour", "blue", "model.colour: unknown key"),
    ("strategy", "fulll", "strategy: must be one of"),
    ("train.lr", "fast", "train.lr: expected a number"),
    ("train.lr", -1.0, "train.lr: must be > 0"),
    ("train.micro_batch_size", 0, "train.micro_batch_size: must be >= 1"),
    ("train.global_batch_size", 8, "train.gradient_accumulation_steps / train.global_batch_size: set exactly one"),
    ("train.epochs", 2, "train.max_steps / train.epochs: set exactly one"),
    ("train.warmup_steps", 400, "train.warmup_steps: 400 exceeds train.max_steps"),
    ("train.precision", "fp8", "train.precision: must be one of"),
    ("train.adam_betas", [0.9], "train.adam_betas: expected two numbers"),
    ("train.optimizer", "paged_adamw_8bit", "train.optimizer: paged_adamw_8bit is for strategy lora/qlora"),
    ("deepspeed.stage", 4, "deepspeed.stage: must be 0, 1, 2 or 3"),
    ("deepspeed.offload_param.device", "gpu", "deepspeed.offload_param.device: must be one of"),
    ("deepspeed.offload_optimizer.device", "nvme", "deepspeed.offload_optimizer.nvme_path: required"),
    ("deepspeed.stage", 2, "deepspeed.offload_param.device: parameter offload needs deepspeed.stage 3"),
    ("model.path", "/nonexistent/model", "model.path: /nonexistent/model has no config.json"),
    ("data.datasets", [{"path": "/nonexistent.jsonl"}], "data.datasets[0].path: /nonexistent.jsonl does not exist"),
    ("data.datasets", [{"path": "x.txt"}], "data.datasets[0].path: x.txt: unsupported file type"),
    ("data.seq_len", "long", "data.seq_len: expected an integer"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps: must be >= 1"),
    ("checkpoint.resume", "/no/such/step-00000010", "checkpoint.resume: /no/such/step-00000010 is neither"),
    ("checkpoint.keep_last", -1, "checkpoint.keep_last: must be >= 0"),
    ("logging.tensorboard", "yes", "logging.tensorboard: expected true/false"),
    ("eval.max_batches", 0, "eval.max_batches: must be >= 1"),
    ("output_dir", "", "output_dir: required"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
@pytest.mark.parametrize("command", ["check", "train"])
def test_bad_config_fails_naming_the_key(tmp_path, base, capsys, key, value, message, command):
    _set(base, key, value)
    # `train` would replace this process with torchrun: returning at all proves nothing was launched.
    assert main([command, str(write(tmp_path, base)), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "run").exists()


def test_all_problems_reported_at_once(tmp_path, base):
    _set(base, "train.lr", "fast")
    _set(base, "deepspeed.stage", 7)
    _set(base, "model.colour", "blue")
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, base))
    keys = [p.split(":")[0] for p in info.value.problems]
    assert {"train.lr", "deepspeed.stage", "model.colour"} <= set(keys)
    assert str(tmp_path / "cfg.yaml") in str(info.value)


def test_overrides_apply_and_are_checked(tmp_path, base):
    path = write(tmp_path, base)
    cfg = load_config(path, ["train.max_steps=7", "deepspeed.offload_param.device=none", "train.lr=3e-4"])
    assert (cfg.train.max_steps, cfg.deepspeed.offload_param.device, cfg.train.lr) == (7, "none", 3e-4)
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(path, ["train.max_steps"])


def test_global_batch_not_divisible_is_refused_before_launch(tmp_path, base, capsys):
    base["train"].pop("gradient_accumulation_steps")
    base["train"]["global_batch_size"] = 6
    assert main(["train", str(write(tmp_path, base)), "--nproc", "4"]) == 2
    assert "train.global_batch_size: train.global_batch_size 6 is not a multiple" in capsys.readouterr().err


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: 1\n   max_steps: 3\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(path)


def test_check_refuses_a_run_that_cannot_fit(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    cfg = "configs/llama3-70b-full-zero3-offload.yaml"
    hardware = ["--gpus-per-node", "8", "--gpu-mem", "80GB", "--cpu-mem", "1TB"]
    assert main(["check", cfg, "--nodes", "4", *hardware]) == 0
    assert "memory       fits" in capsys.readouterr().out
    assert main(["check", cfg, "--nodes", "1", *hardware]) == 2
    err = capsys.readouterr().err
    assert "the run cannot fit" in err and "CPU RAM per node" in err
    assert main(["check", cfg, "--nodes", "1", *hardware, "--allow-no-fit"]) == 0


def test_readme_config_reference_is_current():
    from dtrain.config.reference import reference_markdown

    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- config-reference:start -->\n")[1].split("<!-- config-reference:end -->")[0]
    assert block == reference_markdown(), (
        "README config reference is stale: regenerate with python -m dtrain.config.reference"
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("lora.target_modules=[q_proj, nope_proj]", "lora.target_modules[1]"),
        ("lora.r=0", "lora.r: must be > 0"),
    ],
)
def test_lora_combinations_that_cannot_work_fail_check(tmp_path, tiny_model, capsys, override, message):
    from tests.helpers import write_config

    config = write_config(tmp_path / "cfg.yaml", tiny_model, base="configs/tiny-lora.yaml")
    assert main(["check", str(config), override]) == 2
    assert message in capsys.readouterr().err


def test_qlora_across_nodes_fails_check(tmp_path, tiny_model, capsys):
    from tests.helpers import write_config

    config = write_config(tmp_path / "cfg.yaml", tiny_model, base="configs/tiny-qlora.yaml")
    hardware = ["--gpus-per-node", "1", "--gpu-mem", "24GB", "--cpu-mem", "64GB"]
    assert main(["check", str(config), "--nodes", "2", *hardware]) == 2
    assert "strategy: qlora runs on a single node" in capsys.readouterr().err
