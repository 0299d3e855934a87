"""push=true: offline it is skipped in one line; online it creates a private repo and uploads the export folder."""

from types import SimpleNamespace

import httpx
import pytest
from huggingface_hub import constants

from ftune.errors import FtuneError
from ftune.export.push import push_export


class RecordingApi:
    """Stands in for `HfApi`: records the calls the push makes, answers as the Hub would."""

    def __init__(self, fail: bool = False):
        self.calls = []
        self.fail = fail

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        if self.fail:
            raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution")
        self.calls.append(("upload_folder", kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/abc")


def test_offline_the_push_is_skipped_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    api = RecordingApi()
    line = push_export(tmp_path, "me/tiny", private=True, api=api)
    assert line == f"push skipped: HF_HUB_OFFLINE is set; upload it later with: hf upload me/tiny {tmp_path}"
    assert api.calls == []


def test_online_it_creates_a_private_repo_and_uploads_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = RecordingApi()
    line = push_export(tmp_path, "me/tiny", private=True, api=api)
    assert api.calls == [
        ("create_repo", "me/tiny", {"private": True, "exist_ok": True, "repo_type": "model"}),
        ("upload_folder", {"repo_id": "me/tiny", "folder_path": tmp_path, "repo_type": "model",
                           "commit_message": f"ftune export: {tmp_path.name}"}),
    ]
    assert line == "pushed to https://huggingface.co/me/tiny/commit/abc"


def test_a_failed_upload_says_where_the_export_is(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(FtuneError) as error:
        push_export(tmp_path, "me/tiny", private=True, api=RecordingApi(fail=True))
    assert f"the export is complete in {tmp_path}" in error.value.one_line()
    assert "hf upload me/tiny" in error.value.one_line()
