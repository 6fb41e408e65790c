"""The front door: every wrong input a user can give `dtrain` is refused before anything starts, with one line per
problem naming the key, file or flag, exit 2, nothing created, no traceback; a resumed run is the same run; no file
of a checkpoint can run code on the machine that exports it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from dtrain.checkpoint_layout import STATE_FILE, checkpoint_name
from dtrain.config import dump_yaml
from dtrain.fingerprint import run_fingerprints
from tests.helpers import REPO, run_dtrain, set_key, tiny_config

CLUSTER = str(REPO / "slurm/clusters/testcluster.yaml")


@pytest.fixture
def base(tmp_path, tiny_model) -> dict:
    return tiny_config(tiny_model, tmp_path / "run")


def write(tmp_path: Path, raw: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def dtrain(*argv: str):
    """The CLI in this process (a `train` that tried to launch torchrun fails the test): exit code, stdout, stderr."""
    return run_dtrain(*argv, in_process=True, check=False)


def lora(raw: dict) -> None:
    raw["strategy"] = "lora"


def chat(raw: dict) -> None:
    raw["data"]["datasets"] = [{"path": str(REPO / "data/sample/chat.jsonl"), "format": "chat"}]


def instruction(raw: dict) -> None:
    raw["data"]["datasets"] = [{"path": str(REPO / "data/sample/instruction.jsonl"), "format": "instruction"}]


def a_file(tmp_path: Path, tiny_model: Path) -> str:
    (tmp_path / "a-file").write_text("not a folder")
    return str(tmp_path / "a-file")


def not_a_checkpoint(tmp_path: Path, tiny_model: Path) -> str:
    (tmp_path / "some-folder").mkdir()
    return str(tmp_path / "some-folder")


# (key, value or value(tmp_path, tiny_model), message fragment, extra edit of the raw config or None)
BAD: list[tuple[str, object, str, Callable | None]] = [
    ("train.lr", float("nan"), "train.lr: must be a finite number", None),
    ("train.lr", float("inf"), "train.lr: must be a finite number", None),
    ("train.lr", "fast", "train.lr: expected a number", None),
    ("train.lr", 0.0, "train.lr: must be > 0", None),
    ("train.seed", -1, "train.seed: must be in [0, 2^32)", None),
    ("train.seed", 2**40, "train.seed: must be in [0, 2^32)", None),
    ("train.weight_decay", -0.1, "train.weight_decay: must be >= 0", None),
    ("train.adam_eps", 0.0, "train.adam_eps: must be > 0", None),
    ("train.adam_betas", [0.9, 1.0], "train.adam_betas: expected two numbers in [0, 1)", None),
    ("train.max_grad_norm", -1.0, "train.max_grad_norm: must be >= 0", None),
    ("train.min_lr_ratio", 2.0, "train.min_lr_ratio: must be in [0, 1]", None),
    ("train.scheduler", "exp", "train.scheduler: must be one of", None),
    ("train.max_steps", 0, "train.max_steps: must be >= 1", None),
    ("train.warmup_steps", -1, "train.warmup_steps: must be >= 0", None),
    ("train.gradient_accumulation_steps", 0, "train.gradient_accumulation_steps: must be >= 1", None),
    ("train.micro_batch_size", "two", "train.micro_batch_size: expected an integer", None),
    ("train.optimizer", "sgd", "train.optimizer: must be one of", None),
    ("train.precision", "fp16", "train.precision: must be one of 'bf16', 'fp32'", None),
    ("train", "fast please", "train: expected a section", None),
    ("optimizer", {"lr": 1}, "optimizer: unknown key", None),
    ("strategy", "dora", "strategy: must be one of 'full', 'lora', 'qlora'", None),
    ("lora.r", 0, "lora.r: must be > 0", lora),
    ("lora.alpha", -1, "lora.alpha: must be > 0", lora),
    ("lora.dropout", 1.5, "lora.dropout: must be in [0, 1)", lora),
    ("lora.target_modules", "all", "lora.target_modules: a list of module names or 'all-linear'", lora),
    ("lora.target_modules", [], "lora.target_modules: must not be empty", lora),
    ("lora.target_modules", ["attn"], "lora.target_modules[0]: 'attn' is no module", lora),
    ("lora.modules_to_save", ["head"], "lora.modules_to_save[0]: 'head' is no module", lora),
    ("lora.bias", "some", "lora.bias: must be one of", lora),
    ("quantization.compute_dtype", "int8", "quantization.compute_dtype: must be one of", None),
    ("quantization.quant_type", "int4", "quantization.quant_type: must be one of", None),
    (
        "deepspeed.offload_param.device",
        "cpu",
        "a 4-bit base cannot be offloaded",
        lambda r: set_key(r, "strategy", "qlora"),
    ),
    ("deepspeed.stage", 0, "optimizer offload needs deepspeed.stage >= 1", None),
    ("deepspeed.offload_param.nvme_path", "/nvme", "only used with device nvme", None),
    ("deepspeed.reduce_bucket_size", 0, "deepspeed.reduce_bucket_size: must be >= 1", None),
    ("deepspeed.timeout_minutes", 0, "deepspeed.timeout_minutes: must be >= 1", None),
    ("deepspeed.stage3_param_persistence_threshold", -1, "stage3_param_persistence_threshold: must be >= 0", None),
    ("deepspeed.offload_optimizer.device", "disk", "deepspeed.offload_optimizer.device: must be one of", None),
    ("data.datasets", [], "data.datasets: at least one training dataset is required", None),
    ("data.datasets", [{"path": "x.jsonl", "weight": 0}], "data.datasets[0].weight: must be > 0", None),
    ("data.datasets", [{"path": "x.jsonl", "format": "markdown"}], "data.datasets[0].format: must be one of", None),
    ("data.datasets", [{"path": "x.jsonl", "colour": 1}], "data.datasets[0].colour: unknown key", None),
    ("data.eval_fraction", 1.0, "data.eval_fraction: must be in [0, 1)", None),
    ("data.overlong", "split", "data.overlong: split applies to format text only", chat),
    ("data.group_by_length", True, "data.group_by_length: only with data.packing false", None),
    ("data.instruction_template", "Q: {question}", "data.instruction_template: unknown placeholder", instruction),
    ("data.chat_template", "  ", "data.chat_template: empty", chat),
    ("data.chat_template", "{% if %}", "data.chat_template: line 1: ", chat),
    ("data.chat_template", "{{ messages[0] }", "data.chat_template: line 1: ", chat),
    ("data.on_bad_row", "ignore", "data.on_bad_row: must be one of", None),
    ("data.seq_len", 4, "data.seq_len: must be >= 8", None),
    ("data.seq_len", 10**12, "data.seq_len: 1000000000000 exceeds the model's max_position_embeddings 4096", None),
    ("data.seq_len", 8192, "data.seq_len: 8192 exceeds the model's max_position_embeddings 4096", None),
    ("model.attn_implementation", "flash_attention_2", "flash_attention_2 needs the flash-attn package", None),
    ("model.attn_implementation", "xformers", "model.attn_implementation: must be one of", None),
    ("model.gradient_checkpointing", "yes", "model.gradient_checkpointing: expected true/false", None),
    ("model.tokenizer_path", "/no/such/tokenizer", "model.tokenizer_path: /no/such/tokenizer is not a directory", None),
    ("model.path", a_file, "has no config.json", None),
    ("checkpoint.resume", "", "checkpoint.resume: auto, never, or a checkpoint path", None),
    ("checkpoint.resume", not_a_checkpoint, "is not a complete checkpoint (no trainer_state.json)", None),
    ("checkpoint.every_steps", 1.5, "checkpoint.every_steps: expected an integer", None),
    ("checkpoint.allow_changes", ["train.nope"], "checkpoint.allow_changes[0]: train.nope is no config key", None),
    ("eval.every_steps", -1, "eval.every_steps: must be >= 0", None),
    ("eval.max_batches", "all", "eval.max_batches: expected", None),
    ("logging.every_steps", 0, "logging.every_steps: must be >= 1", None),
    ("output_dir", a_file, "a-file exists and is a file", None),
    ("output_dir", "runs/bad\0name", "output_dir: contains a NUL byte", None),
    ("output_dir", "runs/" + "x" * 300, "output_dir: the name 'xxxxxxxx", None),
    ("output_dir", lambda tmp, model: str(model), "is inside the base model's folder", None),
    ("output_dir", lambda tmp, model: str(model / "run"), "is inside the base model's folder", None),
]


def _bad_config(tmp_path: Path, tiny_model: Path, base: dict, key: str, value, edit) -> Path:
    if edit:
        edit(base)
    set_key(base, key, value(tmp_path, tiny_model) if callable(value) else value)
    return write(tmp_path, base)


@pytest.mark.parametrize("key,value,message,edit", BAD, ids=[f"{i}-{row[0]}" for i, row in enumerate(BAD)])
def test_bad_config_is_refused_by_every_command(tmp_path, tiny_model, base, key, value, message, edit):
    config = str(_bad_config(tmp_path, tiny_model, base, key, value, edit))
    before = sorted(p.name for p in tmp_path.iterdir())
    commands = {
        "check": ["check", config],
        "train": ["train", config, "--nproc", "2"],
        "submit": ["submit", config, "--cluster", CLUSTER, "--dry-run"],
    }
    for name, argv in commands.items():
        result = dtrain(*argv)
        err = result.stderr
        assert result.returncode == 2, f"{name}: {err}"
        assert message in err, f"{name}: {err}"
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created


def test_a_mapping_with_a_key_twice_is_refused_with_its_line(tmp_path, base):
    text = yaml.safe_dump(base) + "deepspeed:\n  stage: 1\n"
    (tmp_path / "dup.yaml").write_text(text)
    result = dtrain("check", str(tmp_path / "dup.yaml"))
    err = result.stderr
    assert result.returncode == 2
    assert "duplicate key 'deepspeed'" in err and "line" in err


def test_a_config_that_is_not_utf8_or_holds_a_python_tag_is_refused(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("output_dir: caf\xe9\n".encode("latin-1"))
    (tmp_path / "tag.yaml").write_text("output_dir: !!python/object/apply:os.system ['touch pwned']\n")
    latin1, tag = dtrain("check", str(tmp_path / "latin1.yaml")), dtrain("check", str(tmp_path / "tag.yaml"))
    assert latin1.returncode == 2 and "not UTF-8 text" in latin1.stderr
    assert tag.returncode == 2 and "invalid YAML" in tag.stderr and not Path("pwned").exists()


def test_a_model_that_needs_its_own_code_is_refused(tmp_path, tiny_model, base):
    custom = tmp_path / "custom-model"
    shutil.copytree(tiny_model, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    base["model"]["path"] = str(custom)
    result = dtrain("check", str(write(tmp_path, base)))
    assert result.returncode == 2
    assert "model.path: " in result.stderr and "its own modelling code" in result.stderr


def test_check_prints_the_verdict_and_the_deepspeed_json_only_on_request(tmp_path, base):
    config = str(write(tmp_path, base))
    short, full = dtrain("check", config), dtrain("check", config, "--show-deepspeed")
    assert short.returncode == full.returncode == 0, short.stderr + full.stderr
    assert f"{config}: OK" in short.stdout and "zero_optimization" not in short.stdout
    assert len(short.stdout.splitlines()) < 20
    shown = full.stdout.split("  deepspeed config:\n", 1)[1]
    assert json.loads(shown)["zero_optimization"]["stage"] == base["deepspeed"]["stage"]


def test_check_says_when_the_chat_template_cannot_render_tools(tmp_path, base):
    from tests.data.test_data_chat_tools import PLAIN_CHATML

    chat(base)
    with_tools = dtrain("check", str(write(tmp_path, base)))  # the tiny model's template renders tools
    base["data"]["chat_template"] = PLAIN_CHATML
    without = dtrain("check", str(write(tmp_path, base)))
    assert with_tools.returncode == without.returncode == 0, with_tools.stderr + without.stderr
    assert "tool" not in with_tools.stdout
    assert (
        "WARNING      data.chat_template: the chat template renders no tool definitions and no tool calls: chat rows "
        "that have them will be refused" in without.stdout
    )


# ---------------------------------------------------------------------------------------------------------------
# A resumed run is the same run


def plant_checkpoint(raw: dict, step: int = 4) -> Path:
    """A complete checkpoint as a run of `raw` leaves it (config, state with fingerprints); no DeepSpeed needed:
    the compatibility check reads only these two files."""
    cfg = load_config_from(raw)
    folder = Path(raw["output_dir"]) / "checkpoints" / checkpoint_name(step)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(dump_yaml(cfg))
    progress = {"step": step, "samples_seen": step * 8, "tokens_seen": 0, "global_batch_size": 8, "world_size": 2}
    state = {"progress": progress, "format": 2, "fingerprints": run_fingerprints(cfg)}
    (folder / STATE_FILE).write_text(json.dumps(state))
    return folder


def load_config_from(raw: dict):
    from dtrain.config import config_from_dict

    return config_from_dict(json.loads(json.dumps(raw)))


def _other_model(tmp_path: Path, tiny_model: Path, **shape) -> str:
    from dtrain.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path / f"other-{len(shape)}", seed=1, **shape))


REFUSED = [
    ("model.path", lambda tmp, model: _other_model(tmp, model), "model.path", "different content"),
    ("model.path", lambda tmp, model: _other_model(tmp, model, num_layers=3), "model.path", "different content"),
    ("strategy", "lora", "strategy", "cannot be loaded"),
    ("data.seq_len", 128, "data.seq_len", "checkpoint.allow_changes"),
    ("data.packing", False, "data.packing", "checkpoint.allow_changes"),
    ("data.datasets", [{"path": str(REPO / "data/sample/chat.jsonl"), "format": "chat"}], "data.datasets[0]", ""),
    ("train.precision", "bf16", "train.precision", "checkpoint.allow_changes"),
    ("train.seed", 7, "train.seed", "checkpoint.allow_changes"),
    ("train.lr", 3e-4, "train.lr", "checkpoint.allow_changes"),
    ("train.global_batch_size", 16, "train.global_batch_size", ""),
    ("train.optimizer", "adamw_deepspeed", "train.optimizer", "cannot be loaded"),
]


@pytest.mark.parametrize("key,value,named,hint", REFUSED, ids=[f"{i}-{r[0]}" for i, r in enumerate(REFUSED)])
def test_resume_refuses_a_change_of_shape_or_meaning(tmp_path, tiny_model, base, key, value, named, hint):
    base["train"].update(gradient_accumulation_steps=None, global_batch_size=8)
    plant_checkpoint(base)
    if key == "train.global_batch_size":
        base["train"]["global_batch_size"] = value
    else:
        set_key(base, key, value(tmp_path, tiny_model) if callable(value) else value)
    config = str(write(tmp_path, base))
    for argv in (["check", config, "--nproc", "2"], ["train", config, "--nproc", "2"]):
        result = dtrain(*argv)
        err = result.stderr
        assert result.returncode == 2, err
        assert f"{named}" in err and "resume" in err and hint in err, err


def test_resume_accepts_safe_changes_and_says_so(tmp_path, tiny_model, base):
    base["train"].update(gradient_accumulation_steps=None, global_batch_size=8)
    plant_checkpoint(base)
    moved = tmp_path / "moved-model"
    shutil.copytree(tiny_model, moved)
    base["model"]["path"] = str(moved)
    base["train"]["max_steps"] = 99
    base["eval"]["every_steps"] = 3
    base["checkpoint"]["keep_last"] = 1
    base["logging"]["every_steps"] = 5
    result = dtrain("check", str(write(tmp_path, base)), "--nproc", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for key in ("model.path", "train.max_steps", "eval.every_steps", "checkpoint.keep_last", "logging.every_steps"):
        assert key in out, out
    assert "same content" in out


def test_a_change_named_in_allow_changes_resumes(tmp_path, tiny_model, base):
    base["train"].update(gradient_accumulation_steps=None, global_batch_size=8)
    plant_checkpoint(base)
    base["train"]["lr"] = 3e-4
    config = str(write(tmp_path, base))
    assert dtrain("check", config, "--nproc", "2").returncode == 2
    allowed = dtrain("check", config, "checkpoint.allow_changes=[train.lr]", "--nproc", "2")
    assert allowed.returncode == 0 and "train.lr" in allowed.stdout


def test_resume_never_on_a_run_with_checkpoints_is_refused_before_launch(tmp_path, base):
    plant_checkpoint(base)
    base["checkpoint"]["resume"] = "never"
    result = dtrain("train", str(write(tmp_path, base)), "--nproc", "2")
    assert result.returncode == 2 and "checkpoint.resume: 'never' but" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# Misuse of the command line


@pytest.fixture
def misuse(tmp_path, tiny_model, base):
    """Paths the CLI misuse table refers to: a valid config, a lora run with a fake checkpoint, a full one, an
    exported adapter's config."""
    config = write(tmp_path, base)
    lora_raw = json.loads(json.dumps(base)) | {"strategy": "lora", "output_dir": str(tmp_path / "lora-run")}
    plant_checkpoint(lora_raw, step=2)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "weights.bin").write_text("x")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model)}))
    paths = {"cfg": str(config), "lora": str(tmp_path / "lora-run"), "adapter": str(tmp_path / "adapter")}
    return {**paths, "tmp": tmp_path}


MISUSE = [
    ([], "the following arguments are required"),
    (["frobnicate"], "invalid choice"),
    (["check"], "the following arguments are required: config"),
    (["check", "{tmp}/missing.yaml"], "cannot read"),
    (["check", "{cfg}", "--nproc", "0"], "--nproc: ranks per node must be >= 1, got 0"),
    (["check", "{cfg}", "--nproc", "-3"], "--nproc: ranks per node must be >= 1, got -3"),
    (["train", "{cfg}", "--nproc", "0"], "--nproc: ranks per node must be >= 1, got 0"),
    (["train", "{cfg}", "--nproc", "two"], "invalid int value"),
    (["check", "{cfg}", "--nodes", "0"], "--nodes: must be >= 1, got 0"),
    (["check", "{cfg}", "train.lr"], "expected key.sub=value"),
    (["check", "{cfg}", "=3"], "expected key.sub=value"),
    (["check", "{cfg}", "train..lr=3"], "expected key.sub=value"),
    (["check", "{cfg}", "train.nope=1"], "train.nope: unknown key"),
    (["check", "{cfg}", "train.max_steps.x=1"], "train.max_steps is not a section"),
    (["check", "{cfg}", "--gpus-per-node", "8"], "--gpu-mem: required with --gpus-per-node"),
    (["check", "{cfg}", "--gpus-per-node", "8", "--gpu-mem", "lots", "--cpu-mem", "1TB"], "size 'lots'"),
    (["plan", "{cfg}"], "the following arguments are required"),
    (["plan", "{cfg}", "--gpus-per-node", "0", "--gpu-mem", "80GB", "--cpu-mem", "1TB"], "need >= 1 node and GPU"),
    (["plan", "{cfg}", "--gpus-per-node", "8", "--gpu-mem=-80GB", "--cpu-mem", "1TB"], "size '-80GB'"),
    (["export", "{lora}"], "nothing to do"),
    (["export", "{tmp}/nowhere", "--adapter", "{tmp}/out"], "no complete checkpoint"),
    (["export", "{lora}", "--adapter", "{tmp}/a-file"], "exists and is not a folder"),
    (["export", "{lora}", "--adapter", "{tmp}/a-file/out"], "is a file, not a folder"),
    (["export", "{lora}", "--adapter", "{tmp}/full"], "exists and is not empty"),
    (["export", "{lora}", "--merged", "{tmp}/out", "--max-shard-size", "lots"], "--max-shard-size: size 'lots'"),
    (["export", "{lora}", "--merged", "{tmp}/out", "--max-shard-size=-1GB"], "--max-shard-size: size '-1GB'"),
    (
        ["export", "{lora}", "--adapter", "{tmp}/out", "--merged", "{tmp}/out"],
        "--adapter and --merged both write {tmp}/out",
    ),
    (["export", "{lora}", "--hf", "{tmp}/out"], "--hf is not for strategy lora"),
    (["export", "{lora}", "--checkpoint", "step-00000099", "--adapter", "{tmp}/out"], "is not a complete checkpoint"),
    (["export", "{lora}", "--checkpoint", "7", "--adapter", "{tmp}/out"], "is not a complete checkpoint"),
    (["eval", "{lora}", "train.nope=1"], "train.nope: unknown key"),
    (["eval", "{lora}", "eval.max_batches=0"], "eval.max_batches: must be >= 1"),
    (["eval", "{adapter}"], "--data: required for {adapter} (adapter): an exported model records no run config"),
    (["tiny-model", "{tmp}/full"], "exists and is not empty"),
    (["tiny-model", "{tmp}/a-file"], "exists and is not empty"),
    (["submit", "{cfg}"], "the following arguments are required: --cluster"),
    (["submit", "{cfg}", "--cluster", "{tmp}/missing.yaml"], "cannot read"),
    (["submit", "{cfg}", "--cluster", CLUSTER, "--nodes", "0", "--dry-run"], "--nodes: must be >= 1, got 0"),
    (["status", "{tmp}/nowhere"], "no Slurm job recorded"),
]


@pytest.mark.parametrize("argv,message", MISUSE, ids=[" ".join(a)[:60] or "nothing" for a, _ in MISUSE])
def test_cli_misuse_is_one_line_exit_2_nothing_written(misuse, argv, message):
    argv = [a.format(**misuse) for a in argv]
    before = sorted(str(p) for p in misuse["tmp"].rglob("*"))
    result = dtrain(*argv)  # argparse's own usage errors exit 2 too
    err = result.stderr
    assert result.returncode == 2, err
    assert message.format(**misuse) in err and "Traceback" not in err, err
    assert sorted(str(p) for p in misuse["tmp"].rglob("*")) == before


# ---------------------------------------------------------------------------------------------------------------
# No pickle from files a user did not write


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_export_refuses_a_checkpoint_that_would_run_code(misuse):
    checkpoint = Path(misuse["lora"]) / "checkpoints" / checkpoint_name(2)
    marker = misuse["tmp"] / "code-ran"
    (checkpoint / "ds").mkdir()
    torch.save(
        {"module": {}, "buffer_names": [], "evil": _Payload(marker)}, checkpoint / "ds" / "mp_rank_00_model_states.pt"
    )
    result = dtrain("export", misuse["lora"], "--adapter", str(misuse["tmp"] / "out"))
    err = result.stderr
    assert result.returncode == 2
    assert "refusing to load" in err and "could run code" in err
    assert not marker.exists() and not (misuse["tmp"] / "out").exists()
