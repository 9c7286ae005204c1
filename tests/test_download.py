from pathlib import Path

import pytest

from kolors_story.models.download import DownloadError, download, main, target_paths


def test_targets_match_config_defaults():
    from tests.helpers import compose

    cfg = compose("generate", ["model=kolors"])
    paths = target_paths(["kolors", "vae", "scorer", "clip", "ip_adapter"], "models")
    assert paths["kolors"] == Path(cfg.model.path)
    assert paths["vae"] == Path(cfg.model.vae_path)
    assert paths["scorer"] == Path(cfg.scorer.path) and paths["clip"] == Path(cfg.scorer.clip_path)
    assert paths["ip_adapter"] == Path(cfg.coherence.reference.path)


def test_unknown_name_is_rejected():
    with pytest.raises(DownloadError, match="choose from"):
        target_paths(["kolorz"], "models")


def test_download_calls_snapshot_into_target(tmp_path):
    calls = []

    def fake_snapshot(model_id, local_dir):
        calls.append((model_id, local_dir))
        return local_dir

    out = download(["vae"], tmp_path, snapshot_download=fake_snapshot)
    assert calls == [("AI-ModelScope/sdxl-vae-fp16-fix", str(tmp_path / "sdxl-vae-fp16-fix"))]
    assert out["vae"] == tmp_path / "sdxl-vae-fp16-fix"


def test_network_failure_is_a_clear_message(tmp_path, capsys, monkeypatch):
    def offline(model_id, local_dir):
        raise ConnectionError("Name or service not known")

    with pytest.raises(DownloadError, match="Could not download Kwai-Kolors/Kolors") as err:
        download(["kolors"], tmp_path, snapshot_download=offline)
    assert "ConnectionError" in str(err.value) and str(tmp_path / "kolors" / "Kolors") in str(err.value)
    import modelscope

    monkeypatch.setattr(modelscope, "snapshot_download", offline, raising=False)
    assert main(["scorer", "--dir", str(tmp_path)]) == 2
    assert "Could not download" in capsys.readouterr().err


def _fake_hub(hub: Path):
    """A local hub: ``snapshot_download(repo_id, local_dir)`` copies ``hub/<repo_id>`` into the folder."""
    import shutil

    def snapshot(repo_id, local_dir=None, **_):
        shutil.copytree(hub / repo_id, local_dir, dirs_exist_ok=True)
        return local_dir

    return snapshot


@pytest.mark.parametrize("source, module, repo", [
    ("hf", "huggingface_hub", "madebyollin/sdxl-vae-fp16-fix"),
    ("modelscope", "modelscope", "AI-ModelScope/sdxl-vae-fp16-fix"),
])
def test_both_sources_fetch_from_their_hub(tmp_path, monkeypatch, capsys, source, module, repo):
    import importlib

    hub = tmp_path / "hub"
    (hub / repo).mkdir(parents=True)
    (hub / repo / "config.json").write_text('{"_class_name": "AutoencoderKL"}')
    monkeypatch.setattr(importlib.import_module(module), "snapshot_download", _fake_hub(hub))
    assert main(["vae", "--source", source, "--dir", str(tmp_path / "models")]) == 0
    assert (tmp_path / "models" / "sdxl-vae-fp16-fix" / "config.json").is_file()
    assert repo in capsys.readouterr().out


def test_every_weight_has_a_hub_repository():
    from kolors_story.models.download import WEIGHTS

    assert all(w.hf_id and w.model_id for w in WEIGHTS.values())
    assert WEIGHTS["kolors"].repo("hf") == "Kwai-Kolors/Kolors-diffusers"
