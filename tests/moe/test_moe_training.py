"""Full fine-tuning of tiny Qwen3-MoE and Mixtral models under ZeRO-3 + CPU offload on 2 real gloo ranks, through the
real CLI: no hang (every launch has a deadline), the same losses as a 1-rank run, every trainable parameter — every
expert of every layer — changed by the first step, and the balancing loss logged apart from train/loss.

Routing differs between the ranks (each routes its own tokens); with fused experts every rank still calls each
layer's experts module once, so ZeRO-3's gathers stay in step. A parameter that received no gradient keeps its value
through AdamW (weight decay 0), so comparing the step-1 checkpoint with the initial weights checks the gradient of
every parameter, and of each expert's slice of the fused 3D tensors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from dtrain.metrics import read_metrics
from tests.helpers import REPO, consolidated, run_dtrain, write_config

pytestmark = pytest.mark.slow  # 1- and 2-rank trainings through the CLI, ~15 s each

STEPS = 3
OVERRIDES = [
    f"train.max_steps={STEPS}", "checkpoint.every_steps=1", "checkpoint.keep_last=0", "eval.every_steps=0",
    "train.gradient_accumulation_steps=null", "train.global_batch_size=8", "data.seq_len=128", "train.warmup_steps=1",
]  # fmt: skip
DEADLINE_S = 600  # a ZeRO-3 hang shows as a timeout, not a stuck test run (a tiny run takes 15-200 s on 2 shared cores)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_moe):
    """runs(model_type, nproc, *overrides) -> run folder, each trained once."""
    done = {}

    def get(model_type: str, nproc: int, *overrides: str):
        key = (model_type, nproc, overrides)
        if key not in done:
            root = tmp_path_factory.mktemp(f"{model_type}-{nproc}rank")
            config = write_config(root / "cfg.yaml", tiny_moe(model_type))
            proc = run_dtrain("train", str(config), *OVERRIDES, *overrides, "--nproc", str(nproc), timeout=DEADLINE_S)
            (root / "run" / "train.log").write_text(proc.stdout + proc.stderr)
            done[key] = root / "run"
        return done[key]

    return get


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_two_ranks_match_one_and_every_expert_trains_on_step_one(runs, tiny_moe, model_type):
    two, one = runs(model_type, 2), runs(model_type, 1)
    losses = read_metrics(two)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in read_metrics(one).items():
        assert losses[step] == pytest.approx(loss, rel=1e-5), step
    aux = read_metrics(two, "train/aux_loss")
    assert sorted(aux) == sorted(losses) and all(value > 0 for value in aux.values())
    assert read_metrics(two, "train/expert_load_max_over_mean")[1] >= 1.0
    assert "experts: grouped_mm (transformers' choice" in (two / "train.log").read_text()

    # named as in the training engine (transformers saves fused experts in the per-expert layout of its 4.x files)
    initial = AutoModelForCausalLM.from_pretrained(tiny_moe(model_type)).state_dict()
    after = consolidated(two / "checkpoints" / "step-00000001")
    assert after.keys() == initial.keys()
    unchanged = [name for name in initial if torch.equal(after[name], initial[name].float())]
    assert unchanged == []
    experts = [name for name in initial if ".experts." in name]
    assert experts
    idle = [
        f"{name}[{e}]" for name in experts for e in range(initial[name].shape[0])
        if torch.equal(after[name][e], initial[name][e].float())
    ]  # fmt: skip
    assert idle == []


def test_coefficient_zero_trains_the_plain_loss(runs):
    """Without the balancing loss nothing router-related is logged, and the loss differs from the default run only
    from step 2 on: step 1's loss comes from the same initial weights, and the balancing term is not in it."""
    default, plain = runs("qwen3_moe", 2), runs("qwen3_moe", 2, "model.router_aux_loss_coef=0")
    assert read_metrics(plain, "train/aux_loss") == {}
    assert read_metrics(plain)[1] == pytest.approx(read_metrics(default)[1], rel=1e-6)


def test_resume_from_a_checkpoint_is_bitwise_and_the_hf_export_loads_in_vanilla_transformers(runs, tiny_moe, tmp_path):
    """A relaunch from the step-2 checkpoint (what a kill -9 after it leaves) repeats step 3 exactly — LM loss and
    balancing loss — with torch AdamW; `export --hf` of the run loads in plain transformers with the engine's
    weights (its logits equal those of the model the checkpoint holds, loaded by dtrain)."""
    from dtrain import strategies
    from dtrain.config import load_config

    reference = runs("qwen3_moe", 2)
    source = reference / "checkpoints" / "step-00000002"
    shutil.copytree(source, tmp_path / "run" / "checkpoints" / source.name)
    config = write_config(tmp_path / "cfg.yaml", tiny_moe("qwen3_moe"))
    run_dtrain("train", str(config), *OVERRIDES, "--nproc", "2", timeout=DEADLINE_S)
    for key in ("train/loss", "train/aux_loss"):
        assert read_metrics(tmp_path / "run", key) == {3: read_metrics(reference, key)[3]}, key

    checkpoint = reference / "checkpoints" / "step-00000003"
    run_dtrain("export", str(checkpoint), "--hf", str(tmp_path / "hf"))
    input_ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save({"input_ids": input_ids}, tmp_path / "batch.pt")
    spec = f"hf:{tmp_path / 'hf'}"
    cmd = [sys.executable, "-m", "tests.adapters.vanilla_logits", str(tmp_path / "batch.pt"), str(tmp_path / "l.pt")]
    subprocess.run([*cmd, spec], cwd=REPO, check=True, timeout=300)
    cfg = load_config(config, OVERRIDES)
    trained = strategies.get("full").eval_model(cfg, checkpoint, torch.device("cpu"))
    with torch.no_grad():
        expected = trained(input_ids=input_ids, use_cache=False).logits.float()
    torch.testing.assert_close(torch.load(tmp_path / "l.pt")[spec], expected, rtol=1e-5, atol=1e-5)
