"""The Hugging Face Hub: checkpoints named by Hub id, and uploading an export.

`model_dir`, `adapter_dir` and `Embedder.from_pretrained` take either a local directory or a
Hub id such as `Qwen/Qwen2-VL-2B-Instruct`. `local_dir` decides which, in this order:

1. a directory that exists is used as it is (a local folder always wins over a Hub id);
2. a value of the Hub id form (`ORG/NAME`, not an absolute or `./` path) is fetched with
   `huggingface_hub.snapshot_download` into its cache (HF_HUB_CACHE / HF_HOME), which also
   answers from the cache alone when HF_HUB_OFFLINE=1 or the Hub cannot be reached;
3. anything else fails with an error that names the config key.

`push_folder` uploads a folder (the export's Hugging Face directory, model card included) to
a Hub model repository with `HfApi.create_repo` and `HfApi.upload_folder`; HF_ENDPOINT and
HF_TOKEN choose the server and the credentials, as everywhere in huggingface_hub.
"""

from __future__ import annotations

import os
import pathlib
import re

# ORG/NAME as the Hub spells repository ids (letters, digits, '-', '_', '.'; no '..').
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


class HubError(ValueError):
    """A model or adapter that is neither a local directory nor a Hub id that resolves, or an
    upload that failed; the message names the config key."""


def is_hub_id(value: str) -> bool:
    """Whether `value` has the form of a Hub repository id (ORG/NAME)."""
    return bool(_HUB_ID.fullmatch(value)) and ".." not in value


def local_dir(value: str | os.PathLike, key: str) -> str:
    """The local directory `value` names: itself when it exists, else the snapshot of the Hub
    id it spells (see the module docstring); '' stays ''.

    Args:
      value: a directory, or a Hub id such as 'Qwen/Qwen2-VL-2B-Instruct'.
      key: the config key it came from, for error messages ('model_dir', 'adapter_dir').
    Raises:
      HubError: not a directory, and not a Hub id that resolves (offline and not cached, no
        such repository, no network).
    """
    value = str(value)
    if not value or pathlib.Path(value).is_dir():
        return value
    if not is_hub_id(value):
        raise HubError(
            f"--config.{key}: {value!r} is not a directory and not a Hugging Face Hub id "
            "(ORG/NAME); point it at a checkpoint directory or give a Hub id"
        )
    from huggingface_hub import snapshot_download  # Only runs that name a Hub id need it.

    try:
        return snapshot_download(repo_id=value)
    except Exception as error:  # Offline and not cached, unknown repo, no network, ...
        raise HubError(
            f"--config.{key}: {value!r} is not a local directory, and the Hugging Face Hub id "
            f"did not resolve ({type(error).__name__}: {error}). Check the id; with "
            "HF_HUB_OFFLINE=1 it must already be in the cache (HF_HUB_CACHE), e.g. from "
            f"`huggingface-cli download {value}` on a machine with network"
        ) from error


def push_folder(folder: str | os.PathLike, repo_id: str, *, message: str) -> str:
    """Uploads every file of `folder` to the Hub model repository `repo_id` (created if
    missing; files of the same name replaced); returns the commit's URL.

    Raises:
      HubError: `repo_id` is not ORG/NAME, or the Hub refused the upload (names
        export.push_to_hub and the reason).
    """
    if not is_hub_id(repo_id):
        raise HubError(f"--config.export.push_to_hub: {repo_id!r} is not a Hub id ORG/NAME")
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message=message
        )
    except Exception as error:
        raise HubError(
            f"--config.export.push_to_hub={repo_id}: the upload of {folder} to {api.endpoint} "
            f"failed ({type(error).__name__}: {error}); check HF_TOKEN (write access to "
            "the repository) and the network, then rerun with --config.force=export"
        ) from error
    return commit.commit_url
