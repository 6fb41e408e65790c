"""Hub repo ids resolved from a local Hugging Face cache (the Hub is unreachable in tests)."""

from __future__ import annotations

import pytest

from dtrain import hub
from tests.hub_cache import add_to_hub_cache


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def hub_model_cfg(tmp_path, repo_id: str, **model):
    """A run config whose model.path is `repo_id` (paths unchecked: the model is in the test's hub cache)."""
    from dtrain.config import config_from_dict

    raw = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": repo_id, **model},
        "data": {"datasets": [{"path": "data/sample/text.jsonl"}]},
        "train": {"max_steps": 1, "gradient_accumulation_steps": 1},
    }
    return config_from_dict(raw, check_paths=False)


def test_repo_id_resolves_to_its_snapshot_and_commit(tmp_path, offline_cache):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "config.json").write_text("{}")
    first = add_to_hub_cache(offline_cache, "acme/tiny", tmp_path / "repo", revision="v1")
    (tmp_path / "repo" / "tokenizer.json").write_text("{}")
    latest = add_to_hub_cache(offline_cache, "acme/tiny", tmp_path / "repo")
    resolved = hub.resolve("acme/tiny")
    assert resolved.commit == latest and (resolved.local / "tokenizer.json").is_file()
    assert hub.resolve("acme/tiny", revision="v1").commit == first
    assert hub.resolve(str(tmp_path / "repo")) == hub.Resolved(tmp_path / "repo")  # a local path stays as given


def test_missing_repo_is_one_line_saying_how_to_download(offline_cache):
    with pytest.raises(hub.HubError) as error:
        hub.resolve("acme/absent", revision="v9")
    assert "\n" not in str(error.value) and "`hf download acme/absent --revision v9`" in str(error.value)


def test_the_resolved_commit_is_the_models_fingerprint(tmp_path, offline_cache):
    from dtrain.fingerprint import run_fingerprints

    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "config.json").write_text("{}")
    first = add_to_hub_cache(offline_cache, "acme/fp", tmp_path / "repo")
    cfg = hub_model_cfg(tmp_path, "acme/fp")
    assert run_fingerprints(cfg)["model"] == f"hub commit {first}"
    (tmp_path / "repo" / "config.json").write_text('{"moved": true}')  # main moves: resume sees another model
    moved = add_to_hub_cache(offline_cache, "acme/fp", tmp_path / "repo")
    hub._resolve_repo.cache_clear()  # a resumed run is a new process, which resolves afresh
    assert run_fingerprints(cfg)["model"] == f"hub commit {moved}" != f"hub commit {first}"


def test_check_names_the_commit_and_trust_remote_code(tmp_path, offline_cache):
    from dtrain_launch.cli import model_line

    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "config.json").write_text("{}")
    commit = add_to_hub_cache(offline_cache, "acme/custom", tmp_path / "repo")
    line = model_line(hub_model_cfg(tmp_path, "acme/custom", trust_remote_code=True))
    assert line == f"acme/custom (Hub commit {commit}); trust_remote_code ON: runs the model repo's own Python code"
