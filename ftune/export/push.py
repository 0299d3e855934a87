"""push=true: upload a finished, parity-checked export to the Hugging Face Hub with `huggingface_hub`.

The export is complete on disk before the upload starts, so a failed push loses nothing: the message says
where the export is and the command that uploads it later.
"""

from pathlib import Path

from ftune.errors import FtuneError


def push_export(out: Path, repo_id: str, private: bool, api=None) -> str:
    """Create `repo_id` if needed (private by default) and upload every file of `out`.

    Args:
        out: the export directory.
        repo_id: `user/name` on the Hub.
        private: visibility of a repository this creates (an existing one keeps its own).
        api: an `HfApi`-like client; the default is `huggingface_hub.HfApi()` with the user's saved token.

    Returns:
        The line to print: where it went, or that it was skipped because the hub is offline.

    Raises:
        FtuneError: the Hub refused the upload or could not be reached.
    """
    import httpx
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    later = f"upload it later with: hf upload {repo_id} {out}"
    if constants.HF_HUB_OFFLINE:
        return f"push skipped: HF_HUB_OFFLINE is set; {later}"
    api = api or HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo_id, folder_path=out, repo_type="model",
                                   commit_message=f"ftune export: {out.name}")
    except (HfHubHTTPError, httpx.HTTPError, OSError) as err:
        raise FtuneError(f"push to {repo_id} failed: {str(err).splitlines()[0]}; the export is complete in {out}",
                         later) from err
    return f"pushed to {commit.commit_url}"
