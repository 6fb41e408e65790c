"""Config: every shipped YAML passes `dtrain check`; bad configs fail naming the key, before any process starts."""

from __future__ import annotations

import pytest

from dtrain.config import ConfigError, load_config
from tests.helpers import REPO, run_dtrain, write_config

SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml"))


def dtrain(*args: str):
    """The CLI in this process: these commands launch nothing (a `train` that tried would fail the test)."""
    return run_dtrain(*args, in_process=True, check=False)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_pass_check(path, monkeypatch):
    monkeypatch.chdir(REPO)
    if "tiny" in path.name and not (REPO / "runs/tiny-model/config.json").exists():
        run_dtrain("tiny-model", "runs/tiny-model", in_process=True)
    result = dtrain("check", str(path.relative_to(REPO)))
    assert result.returncode == 0, result.stderr
    assert f"{path.relative_to(REPO)}: OK" in result.stdout


BAD = [
    ("model.colour", "blue", "model.colour: unknown key"),
    ("logging.tensorboard", True, "logging.tensorboard: replaced by logging.report_to, a list"),
    ("model.router_aux_loss_coef", -0.01, "model.router_aux_loss_coef: must be >= 0"),
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
    ("logging.report_to", ["tensorboard", "neptune"], "logging.report_to: unknown 'neptune'"),
    ("eval.max_batches", 0, "eval.max_batches: must be >= 1"),
    ("output_dir", "", "output_dir: required"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{k}={v}" for k, v, _ in BAD])
@pytest.mark.parametrize("command", ["check", "train"])
def test_bad_config_fails_naming_the_key(tmp_path, tiny_model, key, value, message, command):
    config = write_config(tmp_path / "cfg.yaml", tiny_model, **{key: value})
    result = dtrain(command, str(config), "--nproc", "2")  # a `train` that launched torchrun fails the helper
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "run").exists()


def test_all_problems_reported_at_once(tmp_path, tiny_model):
    bad = {"train.lr": "fast", "deepspeed.stage": 7, "model.colour": "blue"}
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path / "cfg.yaml", tiny_model, **bad))
    keys = [p.split(":")[0] for p in info.value.problems]
    assert {"train.lr", "deepspeed.stage", "model.colour"} <= set(keys)
    assert str(tmp_path / "cfg.yaml") in str(info.value)


def test_overrides_apply_and_are_checked(tmp_path, tiny_model):
    path = write_config(tmp_path / "cfg.yaml", tiny_model)
    cfg = load_config(path, ["train.max_steps=7", "deepspeed.offload_param.device=none", "train.lr=3e-4"])
    assert (cfg.train.max_steps, cfg.deepspeed.offload_param.device, cfg.train.lr) == (7, "none", 3e-4)
    with pytest.raises(ConfigError, match="train.nope: unknown key"):
        load_config(path, ["train.nope=1"])
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(path, ["train.max_steps"])


def test_global_batch_not_divisible_is_refused_before_launch(tmp_path, tiny_model):
    batch = {"train.gradient_accumulation_steps": None, "train.global_batch_size": 6}
    result = dtrain("train", str(write_config(tmp_path / "cfg.yaml", tiny_model, **batch)), "--nproc", "4")
    assert result.returncode == 2
    assert "train.global_batch_size: train.global_batch_size 6 is not a multiple" in result.stderr


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: 1\n   max_steps: 3\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(path)


def test_check_refuses_a_run_that_cannot_fit(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = "configs/llama3-70b-full-zero3-offload.yaml"
    hardware = ["--gpus-per-node", "8", "--gpu-mem", "80GB", "--cpu-mem", "1TB"]
    fits = dtrain("check", cfg, "--nodes", "4", *hardware)
    assert fits.returncode == 0 and "memory       fits" in fits.stdout
    too_big = dtrain("check", cfg, "--nodes", "1", *hardware)
    assert too_big.returncode == 2
    assert "the run cannot fit" in too_big.stderr and "CPU RAM per node" in too_big.stderr
    assert dtrain("check", cfg, "--nodes", "1", *hardware, "--allow-no-fit").returncode == 0


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
        ("lora.init_lora_weights=eva", "lora.init_lora_weights: 'eva' is not supported by dtrain: it needs a pass"),
        ("lora.init_lora_weights=loftq", "'loftq' is not supported by dtrain: it replaces the base"),
        ("lora.init_lora_weights=mica", "'mica' is not supported by dtrain: it freezes B"),
        ("lora.init_lora_weights=pisa", "lora.init_lora_weights: must be one of true, false, gaussian"),
        ("lora.loraplus_lr_ratio=0", "lora.loraplus_lr_ratio: must be > 0"),
    ],
)
def test_lora_combinations_that_cannot_work_fail_check(tmp_path, tiny_model, override, message):
    config = write_config(tmp_path / "cfg.yaml", tiny_model, base="configs/tiny-lora.yaml")
    result = dtrain("check", str(config), override)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize(
    "base,overrides,message",
    [
        ("tiny-qlora", ["lora.init_lora_weights=pissa_niter_4"], "pissa_niter_4 decomposes the full-precision base"),
        (
            "tiny-qlora",
            ["lora.init_lora_weights=olora"],
            "olora decomposes the full-precision base weight, which qlora",
        ),
        ("tiny-lora", ["lora.init_lora_weights=pissa", "lora.use_dora=true"], "pissa with lora.use_dora is refused"),
        ("tiny-lora", ["lora.init_lora_weights=orthogonal", "lora.r=7"], "orthogonal needs an even lora.r, got 7"),
    ],
)
def test_peft_variants_that_cannot_work_with_the_strategy_fail_before_launch(tmp_path, tiny_model, base, overrides,
                                                                             message):  # fmt: skip
    """peft itself would fail later (PiSSA on a 4-bit weight: TypeError in get_peft_model on every rank) or the
    export could not be what it claims; `dtrain check` and `dtrain train` say why before any process starts."""
    config = write_config(tmp_path / "cfg.yaml", tiny_model, base=f"configs/{base}.yaml")
    for command in ("check", "train"):
        result = dtrain(command, str(config), *overrides)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, command
    assert not (tmp_path / "run").exists()


def test_qlora_across_nodes_fails_check(tmp_path, tiny_model):
    config = write_config(tmp_path / "cfg.yaml", tiny_model, base="configs/tiny-qlora.yaml")
    hardware = ["--gpus-per-node", "1", "--gpu-mem", "24GB", "--cpu-mem", "64GB"]
    result = dtrain("check", str(config), "--nodes", "2", *hardware)
    assert result.returncode == 2 and "strategy: qlora runs on a single node" in result.stderr
