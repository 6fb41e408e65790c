"""Forgetting, measured: eval.retention during training (step-0 baseline, drift, kept on resume) and `dtrain eval`
(agrees with the trainer's eval; an exported adapter evaluates like its checkpoint; bad input is one line, exit 2).

Every test here shares one 2-rank LoRA run under ZeRO-3: 2 steps, then resumed to 4 (constant lr, so the schedule
does not depend on the length); `dtrain eval` runs in-process."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

from dtrain.config import ConfigError, load_config
from dtrain.evaluation import eval_batches
from dtrain.metrics import read_metrics
from tests.helpers import REPO, run_dtrain, write_config

pytestmark = pytest.mark.slow  # 2-rank trainings through the CLI

SEQ_LEN = 128
OVERRIDES = [
    "train.max_steps=2", "train.warmup_steps=1", "train.scheduler=constant", "checkpoint.every_steps=2",
    "checkpoint.keep_last=0", "eval.every_steps=2", "eval.max_batches=null", f"data.seq_len={SEQ_LEN}",
    "export.on_finish=adapter",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model) -> Path:
    """The run folder; its config is cfg.yaml beside it, general.jsonl the retention set, train.log what the
    resumed launch printed."""
    root = tmp_path_factory.mktemp("retention")
    general = root / "general.jsonl"
    general.write_text("".join((REPO / "data/sample/text.jsonl").read_text().splitlines(True)[-24:]))
    config = write_config(root / "cfg.yaml", tiny_model, base="configs/tiny-lora.yaml")
    raw = load_config(config, OVERRIDES).to_dict()
    raw["eval"]["retention"] = {"general": {"path": str(general), "format": "text"}}
    config.write_text(json.dumps(raw))  # JSON is YAML
    launch(config)
    (root / "train.log").write_text(launch(config, "train.max_steps=4"))
    return root / "run"


def launch(config: Path, *overrides: str) -> str:
    """The torchrun command `dtrain train --nproc 2` runs, without the launcher's own checks (the ranks repeat
    them; tests/test_front_door.py covers the launcher): what it printed."""
    from dtrain_launch.torchrun import torchrun_command

    cmd, env = torchrun_command(str(config), list(overrides), 2)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout + proc.stderr


def independent_loss(model_path: Path, rows_file: Path) -> float:
    """Mean next-token cross-entropy of the plain transformers model over each document (bos + text + eos, cut to
    SEQ_LEN) run on its own: no dtrain code, no packing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    total, count = 0.0, 0
    with torch.no_grad():
        for line in rows_file.read_text().splitlines():
            ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[tokenizer.bos_token_id, *ids, tokenizer.eos_token_id][:SEQ_LEN]])
            logits = model(ids).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total / count


def test_retention_at_step_0_is_the_base_models_loss_and_drift_follows(run, tiny_model):
    loss = read_metrics(run, "retention/general/loss")
    drift = read_metrics(run, "retention/general/drift")
    assert sorted(loss) == [0, 2, 4] and sorted(drift) == [0, 2, 4]
    assert loss[0] == pytest.approx(independent_loss(tiny_model, run.parent / "general.jsonl"), rel=1e-5)
    assert drift[0] == 0.0
    assert all(drift[s] == pytest.approx(loss[s] - loss[0], abs=1e-6) for s in (2, 4))
    assert loss[4] != loss[0]  # the adapter moved the model
    state = json.loads((run / "checkpoints/step-00000004/trainer_state.json").read_text())
    assert state["progress"]["retention_baseline"] == {"general": loss[0]}


def test_the_summary_prints_task_eval_loss_and_retention_drift(run):
    printed = (run.parent / "train.log").read_text()
    eval_loss = read_metrics(run, "eval/loss")[4]
    loss = read_metrics(run, "retention/general/loss")
    assert f"eval loss {eval_loss:.4f} at step 4" in printed
    drift = f"{loss[4] - loss[0]:+.4f}"
    assert f"retention general: loss {loss[4]:.4f} at step 4, {loss[0]:.4f} at step 0 (drift {drift})" in printed


def test_a_resumed_run_keeps_the_baseline_of_its_first_launch(run):
    """Step 0 is measured once, by the first launch; the resumed one reads it from the checkpoint at step 2 and
    carries it on."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "retention/general/loss" in r] == [0, 2, 4]
    assert "resumed from" in (run.parent / "train.log").read_text()
    baselines = [
        json.loads((run / f"checkpoints/step-0000000{s}/trainer_state.json").read_text())["progress"][
            "retention_baseline"
        ]
        for s in (2, 4)
    ]
    assert baselines == [{"general": read_metrics(run, "retention/general/loss")[0]}] * 2


def eval_output(*args: str) -> tuple[str, dict[str, tuple[list[int], list[float]]]]:
    """`dtrain eval ARGS` in-process -> what it printed, and data set name -> ([blocks evaluated, blocks in the
    set], [tokens, loss, ppl, base loss, base ppl, change])."""
    out = run_dtrain("eval", *args, in_process=True).stdout
    rows = {}
    for line in out.splitlines()[5:]:
        name, blocks, *numbers = line.split()
        rows[name] = ([int(n) for n in blocks.split("/")], [float(n.replace(",", "")) for n in numbers])
    return out, rows


def eval_table(*args: str) -> dict[str, list[float]]:
    """`dtrain eval ARGS` in-process -> data set name -> the numbers of its row."""
    return {name: numbers for name, (_, numbers) in eval_output(*args)[1].items()}


def test_dtrain_eval_agrees_with_the_trainers_own_eval(run):
    rows = eval_table(str(run), "--checkpoint", "step-00000002", "--data", str(run.parent / "cfg.yaml"))
    assert sorted(rows) == ["eval", "general"]
    tokens, loss, ppl, base_loss, _, change = rows["eval"]
    assert loss == pytest.approx(read_metrics(run, "eval/loss")[2], abs=1e-4)  # the table prints 4 decimals
    assert ppl == pytest.approx(torch.tensor(loss).exp().item(), rel=1e-3) and change == pytest.approx(
        loss - base_loss, abs=2e-4
    )
    general = read_metrics(run, "retention/general/loss")
    assert rows["general"][1] == pytest.approx(general[2], abs=1e-4)
    assert rows["general"][3] == pytest.approx(general[0], abs=1e-4)  # the base: the step-0 baseline


def test_dtrain_eval_of_a_run_evaluates_what_its_trainer_did(tmp_path, tiny_model):
    """The shipped tiny LoRA config (eval.max_batches 4) trained on 2 ranks with data.seq_len on the command line:
    `dtrain eval RUN` evaluates what the checkpoint's resolved config says, the trainer's blocks at its seq_len, and
    takes key=value overrides."""
    keys = {"train.max_steps": 2, "train.warmup_steps": 1, "eval.every_steps": 2, "checkpoint.every_steps": 2}
    launch(write_config(tmp_path / "cfg.yaml", tiny_model, base="configs/tiny-lora.yaml", **keys), "data.seq_len=128")
    run = tmp_path / "run"
    out, rows = eval_output(str(run))
    (blocks, total), numbers = rows["eval"]
    assert "seq_len 128," in out and "eval.max_batches 4 per rank x 2 rank(s)" in out, out
    assert blocks == 4 * 2 * 2 < total  # max_batches x ranks x micro batch, of a larger eval split
    assert numbers[1] == pytest.approx(read_metrics(run, "eval/loss")[2], abs=1e-4)  # the table prints 4 decimals
    out, every = eval_output(str(run), "eval.max_batches=null")
    assert every["eval"][0] == [total, total] and "every block (eval.max_batches null)" in out


def test_an_exported_adapter_evaluates_like_its_checkpoint(run):
    """export.on_finish wrote the final checkpoint's adapter; peft loads it onto the base it names."""
    data = str(run.parent / "cfg.yaml")
    from_export = eval_table(str(run / "adapter"), "--data", data)
    from_checkpoint = eval_table(str(run), "--data", data)
    assert sorted(from_export) == sorted(from_checkpoint) == ["eval", "general"]
    for name, numbers in from_checkpoint.items():
        assert from_export[name] == pytest.approx(numbers, abs=1e-4)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--checkpoint", "step-00000003", "--data", "{general}"], "step-00000003 is not a complete checkpoint"),
        (["--data", "{missing}"], "--data: {missing} does not exist"),
        (["--data", "notes.txt"], "--data: notes.txt: unsupported file type"),
        (["--data", "{bad_config}"], "train.lr: expected a number"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, argv, message):
    bad_config = tmp_path / "bad.yaml"
    bad_config.write_text((run.parent / "cfg.yaml").read_text().replace('"lr": 0.002', '"lr": "fast"'))
    names = {"general": str(run.parent / "general.jsonl"), "missing": str(tmp_path / "gone.jsonl"),
             "bad_config": str(bad_config)}  # fmt: skip
    proc = run_dtrain("eval", str(run), *(a.format(**names) for a in argv), in_process=True, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert message.format(**names) in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# No training needed


@pytest.mark.parametrize(("samples", "world", "micro", "cap"), [(10, 2, 2, None), (7, 3, 2, None), (9, 2, 2, 2)])
def test_eval_batches_cover_each_sample_once_with_equal_counts_per_rank(samples, world, micro, cap):
    per_rank = [eval_batches(samples, rank, world, micro, cap) for rank in range(world)]
    assert len({len(batches) for batches in per_rank}) == 1  # ZeRO-3: every rank runs as many forwards
    covered = sorted(i for batches in per_rank for batch in batches for i in batch)
    limit = samples if cap is None else min(samples, cap * world * micro)
    assert covered == list(range(limit))


@pytest.mark.filterwarnings("ignore")
def test_retention_config_problems_name_their_key(tmp_path, tiny_model):
    config = write_config(tmp_path / "cfg.yaml", tiny_model, base="configs/tiny-lora.yaml")
    with pytest.raises(ConfigError) as error:
        load_config(config, ["eval.retention={general: {path: gone.jsonl}, a/b: {path: x.parquet}}"])
    assert "eval.retention.general.path: gone.jsonl does not exist" in error.value.problems
    assert any(re.match(r"eval\.retention\.a/b: a name must be", p) for p in error.value.problems)


@pytest.mark.long
@pytest.mark.parametrize(("base", "overrides"), [
    ("configs/tiny-full-zero3.yaml", []),
    ("configs/tiny-qlora.yaml", ["deepspeed.stage=3"]),
])  # fmt: skip
def test_dtrain_eval_agrees_with_the_trainer_for_full_and_qlora(tmp_path, tiny_model, base, overrides):
    """The strategies' other two model builds: ZeRO-3 shards consolidated (full), the 4-bit base (qlora)."""
    config = write_config(tmp_path / "cfg.yaml", tiny_model, base=base)
    retention = {"general": {"path": str(REPO / "data/sample/instruction.jsonl"), "format": "instruction"}}
    raw = load_config(config, [*OVERRIDES[:-1], *overrides]).to_dict()
    raw["eval"]["retention"] = retention
    config.write_text(json.dumps(raw))
    launch(config)
    run = tmp_path / "run"
    rows = eval_table(str(run), "--data", str(config))
    general = read_metrics(run, "retention/general/loss")
    assert rows["eval"][1] == pytest.approx(read_metrics(run, "eval/loss")[2], abs=2e-4)
    assert rows["general"][1] == pytest.approx(general[2], abs=2e-4)
    assert rows["general"][3] == pytest.approx(general[0], abs=2e-4)
