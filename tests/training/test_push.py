"""push_to_hub: checked before any training (token, network, repository id), then final/ and the report
uploaded at the end. The Hub is faked: tests never use the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from conftest import write_jsonl
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import filter_repo_objects

from smolalign.cli import main
from smolalign.config.train import load_config
from smolalign.errors import RunError, UserError
from smolalign.training import push

WRITE_ACCOUNT = {"name": "me", "auth": {"accessToken": {"role": "write"}}}


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    for variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


@pytest.fixture
def fake_hub(monkeypatch):
    """A reachable Hub with a valid write token, recording repositories created and folders uploaded with
    the files each upload would send."""
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(push, "hub_reachable", lambda: True)
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, *args, **kwargs: WRITE_ACCOUNT)
    record = {"repos": [], "uploads": []}

    def create_repo(self, repo_id, **kwargs):
        record["repos"].append((repo_id, kwargs))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, allow_patterns=None, **kwargs):
        folder = Path(folder_path)
        files = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file()]
        sent = sorted(filter_repo_objects(files, allow_patterns=allow_patterns))
        record["uploads"].append({"repo_id": repo_id, "folder": folder, "path_in_repo": path_in_repo, "files": sent})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return record


def config_with(**values):
    return load_config(None, {"push_to_hub": True, **values})


# -- before training -------------------------------------------------------------------------------


def test_no_push_needs_nothing(no_token):
    assert push.check_push_access(load_config()) is None


def test_missing_token_is_one_sentence(no_token):
    with pytest.raises(UserError, match=r"push_to_hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN"):
        push.check_push_access(config_with())


def test_unreachable_hub_is_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(push, "hub_reachable", lambda: False)
    with pytest.raises(UserError, match="the Hugging Face Hub, which is unreachable"):
        push.check_push_access(config_with())


def test_repository_id_defaults_to_namespace_and_run_folder(fake_hub):
    assert push.check_push_access(config_with(output_dir="runs/dpo beta=0.1")) == "me/dpo-beta-0.1"
    assert push.check_push_access(config_with(hub_model_id="smol-dpo")) == "me/smol-dpo"
    assert push.check_push_access(config_with(hub_model_id="my-org/smol-dpo")) == "my-org/smol-dpo"


def test_refused_and_read_only_tokens(fake_hub, monkeypatch):
    def refused(self, *args, **kwargs):
        request = httpx2.Request("GET", "https://huggingface.co/api/whoami-v2")
        raise HfHubHTTPError("401 Client Error: Unauthorized", response=httpx2.Response(401, request=request))

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", refused)
    with pytest.raises(UserError, match="refused your token"):
        push.check_push_access(config_with())
    read_only = {"name": "me", "auth": {"accessToken": {"role": "read"}}}
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, *args, **kwargs: read_only)
    with pytest.raises(UserError, match="read-only"):
        push.check_push_access(config_with())


def test_invalid_hub_model_id_is_a_config_error():
    with pytest.raises(UserError, match="'hub_model_id' must be 'name' or 'namespace/name'"):
        config_with(hub_model_id="a/b/c")


@pytest.mark.slow
def test_train_without_token_fails_before_training(tmp_path):
    """Offline and without a token, `smolalign train` stops before it reads any data (the dataset named here
    does not even exist) and leaves no metrics and no final/."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "smolalign", "train", "--dataset", str(tmp_path / "missing.jsonl"),
         "--output_dir", str(run), "--push_to_hub", "--hub_model_id", "me/run"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "smolalign: error: push_to_hub needs a Hugging Face token")
    assert "Traceback" not in result.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "final").exists()


def test_train_offline_with_token_fails_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(push, "hub_reachable", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", str(tmp_path / "missing.jsonl"), "--output_dir", str(tmp_path / "run"),
              "--push_to_hub"])
    assert exit_info.value.code == 2
    assert "unreachable" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- after training --------------------------------------------------------------------------------


def fake_run(folder: Path) -> Path:
    for name in ("final/config.json", "final/model.safetensors", "final/README.md", "final/tokenizer.json",
                 "report.html", "report.md", "plots/loss.png", "config.yaml", "metrics.jsonl",
                 "checkpoint-2/optimizer.bin", ".lock"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    return folder


def test_push_run_uploads_final_then_the_report(tmp_path, fake_hub):
    run = fake_run(tmp_path / "run")
    url = push.push_run(run, config_with(output_dir=str(run), hub_model_id="me/smol", hub_private=True))
    assert url == "https://huggingface.co/me/smol"
    assert fake_hub["repos"] == [("me/smol", {"private": True, "exist_ok": True, "repo_type": "model"})]
    model, report = fake_hub["uploads"]
    # final/ at the root of the repository: from_pretrained("me/smol") loads it, README.md is the model card
    assert model["folder"] == run / "final" and model["path_in_repo"] is None
    assert model["files"] == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    # the report beside it, without checkpoints or the lock
    assert report["folder"] == run and report["path_in_repo"] == "report"
    assert report["files"] == ["config.yaml", "metrics.jsonl", "plots/loss.png", "report.html", "report.md"]


def test_failed_upload_keeps_the_run_and_says_how_to_retry(tmp_path, fake_hub, monkeypatch):
    def no_network(self, **kwargs):
        raise OSError("Connection reset by peer")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", no_network)
    run = fake_run(tmp_path / "run")
    with pytest.raises(RunError, match=rf"uploading it to 'me/smol' failed .*hf upload me/smol {run / 'final'}"):
        push.push_run(run, config_with(output_dir=str(run), hub_model_id="me/smol"))


def test_token_gone_by_the_end_is_a_run_error(tmp_path, fake_hub, monkeypatch):
    def offline(self, *args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", offline)
    run = fake_run(tmp_path / "run")
    with pytest.raises(RunError, match="the run is complete in .*, but was not uploaded: .*could not check your token"):
        push.push_run(run, config_with(output_dir=str(run)))
    assert fake_hub["uploads"] == []


def test_train_pushes_the_finished_run(tmp_path, tiny_model, hh_rows, fake_hub):
    data = write_jsonl(tmp_path / "pairs.jsonl", hh_rows[:4])
    run = tmp_path / "run"
    main(["train", "--model", str(tiny_model(0)), "--dataset", str(data), "--output_dir", str(run),
          "--max_steps", "1", "--per_device_train_batch_size", "2", "--max_length", "256",
          "--push_to_hub", "--hub_model_id", "me/tiny-dpo"])
    assert [repo for repo, _ in fake_hub["repos"]] == ["me/tiny-dpo"]
    model, report = fake_hub["uploads"]
    assert model["folder"] == run / "final" and "model.safetensors" in model["files"] and "README.md" in model["files"]
    assert "report.html" in report["files"] and "config.yaml" in report["files"]
