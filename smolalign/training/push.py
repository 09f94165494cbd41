"""Pushing a finished run to the Hugging Face Hub: access checked before training, upload at the end."""

from __future__ import annotations

import re
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
from huggingface_hub.utils import HFValidationError, validate_repo_id

from smolalign.config.train import TrainConfig
from smolalign.errors import RunError, UserError, first_line
from smolalign.hub import hub_reachable
from smolalign.run_folder import RunFolder


def check_push_access(config: TrainConfig) -> str | None:
    """For `push_to_hub: true`, the repository id to push to, after checking what an upload at the end of
    the run will need: a token, a reachable Hub that accepts the token, a valid repository id. Call it
    before training, so that an hour of training never ends in a failed upload that could have been
    foreseen. None when the run does not push."""
    if not config.push_to_hub:
        return None
    if huggingface_hub.get_token() is None:
        raise UserError("push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN (with write "
                        "access), or remove push_to_hub.")
    if not hub_reachable():
        raise UserError("push_to_hub needs the Hugging Face Hub, which is unreachable from here (no network, or "
                        "HF_HUB_OFFLINE is set); connect, or remove push_to_hub and upload final/ later.")
    return hub_repo_id(config)


def hub_repo_id(config: TrainConfig) -> str:
    """`hub_model_id`, with your namespace when it has none; default: the output_dir folder name (as TRL)."""
    try:
        account = huggingface_hub.HfApi().whoami()
    except Exception as error:  # refused token, network failure
        if getattr(getattr(error, "response", None), "status_code", None) == 401:
            raise UserError("push_to_hub: the Hugging Face Hub refused your token (invalid or expired); log in "
                            "again with `hf auth login`.") from None
        raise UserError(f"push_to_hub: the Hugging Face Hub could not check your token ({first_line(error)}); check "
                        "the network and try again.") from None
    if account.get("auth", {}).get("accessToken", {}).get("role") == "read":
        raise UserError("push_to_hub: your Hugging Face token is read-only; create one with write access and log "
                        "in with `hf auth login`.")
    name = config.hub_model_id or re.sub(r"[^\w.-]+", "-", Path(config.output_dir).resolve().name).strip("-.")
    repo_id = name if "/" in name else f"{account['name']}/{name}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise UserError(f"push_to_hub: '{repo_id}' is not a valid Hub repository id; set hub_model_id to "
                        "'namespace/name' (letters, digits, '-', '_', '.').") from None
    return repo_id


def push_run(output_dir: Path, config: TrainConfig) -> str:
    """Upload `final/` (the model and its card) to the root of the repository, and the report with the
    config and metrics under `report/`; returns the repository's URL. A failed upload is a RunError that
    says how to retry: the run itself is complete on disk."""
    run = RunFolder(Path(output_dir))
    final = run.final
    try:
        repo_id = hub_repo_id(config)  # checked before training; the network or the token may have gone since
    except UserError as error:
        raise RunError(f"the run is complete in '{output_dir}', but was not uploaded: {error}") from None
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo_id, private=config.hub_private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=repo_id, folder_path=final, commit_message="smolalign: final model")
        api.upload_folder(repo_id=repo_id, folder_path=output_dir, path_in_repo="report",
                          allow_patterns=run.published_files(), commit_message="smolalign: training report")
    except Exception as error:  # network failure, refused permission, full quota: the run stays as it is
        raise RunError(f"the run is complete in '{output_dir}', but uploading it to '{repo_id}' failed "
                       f"({first_line(error)}); upload it later with `hf upload {repo_id} {final}`.") from None
    return str(url)
