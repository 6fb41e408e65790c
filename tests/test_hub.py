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
