"""The Hugging Face ecosystem in and out, in one tiny 2-rank LoRA run (~40 s, marked slow):

a Hub model id and a Hub chat dataset read from a local hub cache offline, a training chat template that differs
from the tokenizer's, W&B (offline) and MLflow (file store) beside TensorBoard, and export.on_finish: adapter.
Then, on that run: the adapter names the base by its repo id and loads onto it, the exported tokenizer renders a
conversation exactly as training did, every reporter's scalars equal metrics.jsonl, and the merged kind of
export_on_finish gives the adapter model's logits.
"""

from __future__ import annotations

import json

import pytest
import torch

from dtrain.data.chat import chat_example
from dtrain.metrics import read_metrics
from dtrain.tiny import CHAT_TEMPLATE, SAMPLE_DIR
from tests.helpers import run_dtrain, write_config
from tests.hub_cache import add_to_hub_cache
from tests.test_reporters import mlflow_scalars, tensorboard_scalars, wandb_scalars

pytestmark = pytest.mark.slow

# The tokenizer's template with another assistant header: proof that the export carries the one training used.
TRAINING_TEMPLATE = CHAT_TEMPLATE.replace("<|im_start|>assistant", "<|im_start|>bot")
STEPS = 4


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("hub-e2e")
    hub = root / "hub"
    commit = add_to_hub_cache(hub, "acme/tiny", tiny_model)
    (root / "chats" / "data").mkdir(parents=True)
    (root / "chats" / "data" / "train.jsonl").write_text((SAMPLE_DIR / "chat.jsonl").read_text())
    add_to_hub_cache(hub, "acme/chats", root / "chats", repo_type="dataset")
    config = write_config(
        root / "cfg.yaml",
        tiny_model,
        base="configs/tiny-lora.yaml",
        **{
            "model.path": "acme/tiny",
            "data.datasets": [{"path": "acme/chats", "format": "chat"}],
            "data.chat_template": TRAINING_TEMPLATE,
            "data.eval_fraction": 0.0,
            "data.num_proc": 2,
            "train.max_steps": STEPS,
            "train.warmup_steps": 0,
            "checkpoint.every_steps": STEPS,
            "logging.report_to": ["tensorboard", "wandb", "mlflow"],
            "export.on_finish": "adapter",
        },
    )
    env = {
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",  # the test machine has no network: check and train read the cache only
        "HF_DATASETS_CACHE": str(root / "hf-datasets"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_DATA_DIR": str(root / "wandb-data"),
    }
    checked = run_dtrain("check", str(config), env=env)
    assert f"acme/tiny (Hub commit {commit})" in checked.stdout
    run_dtrain("train", str(config), "--nproc", "2", env=env)
    return root / "run", hub / "models--acme--tiny" / "snapshots" / commit


def test_adapter_on_finish_names_the_repo_id_and_loads_onto_the_base(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, snapshot = finished_run
    adapter = run / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/tiny"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(snapshot), adapter)
    trained = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert trained and all(p.abs().sum() > 0 for p in trained)  # lora_B starts at zero: these were trained


def test_exported_tokenizer_renders_a_conversation_as_training_did(finished_run):
    from transformers import AutoTokenizer

    from dtrain.config import DatasetConfig

    run, snapshot = finished_run
    row = json.loads((SAMPLE_DIR / "chat.jsonl").read_text().splitlines()[0])
    trained_on = chat_example(
        row, DatasetConfig(format="chat"), AutoTokenizer.from_pretrained(snapshot), TRAINING_TEMPLATE
    )
    exported = AutoTokenizer.from_pretrained(run / "adapter")
    assert exported.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"] == (
        trained_on.input_ids.tolist()
    )


def test_every_reporter_holds_the_logged_losses(finished_run):
    run, _ = finished_run
    losses = read_metrics(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert tensorboard_scalars(run / "tensorboard", "train/loss") == pytest.approx(losses)
    assert wandb_scalars(run, "train/loss") == pytest.approx(losses)
    assert mlflow_scalars(run, "train/loss") == pytest.approx(losses)


def test_merged_export_on_finish_matches_the_adapter_model(finished_run, monkeypatch):
    from huggingface_hub import constants
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from dtrain.config import load_config
    from dtrain.finish import export_on_finish

    run, snapshot = finished_run
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(snapshot.parents[2]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cfg = load_config(run.parent / "cfg.yaml", check_paths=False)
    merged = AutoModelForCausalLM.from_pretrained(export_on_finish(cfg, "merged"))
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(snapshot), run / "adapter")
    ids = torch.arange(5, 40)[None]
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-4)
