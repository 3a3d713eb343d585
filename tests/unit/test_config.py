"""Settings precedence: CLI/explicit > TESSERA_* env > tessera.yaml > defaults."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from attention_backends.config import AttentionSettings
from attention_backends.policy import SMOLLM2_135M, ModelFingerprint
from server.cli import build_parser
from server.config import ServerSettings


@pytest.fixture
def yaml_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "tessera.yaml"
    path.write_text("server:\n  port: 9001\n  workers: 3\n  api_keys: [a, b]\n"
                    "attention:\n  method: trianglemix\n  dense_first_layers: 4\n")
    monkeypatch.setenv("TESSERA_CONFIG", str(path))
    return path


def test_yaml_sections_configure_each_package(yaml_config: Path) -> None:
    server = ServerSettings()
    assert (server.port, server.workers, server.api_keys) == (9001, 3, ["a", "b"])
    attention = AttentionSettings()
    assert (attention.method, attention.dense_first_layers) == ("trianglemix", 4)


def test_env_overrides_yaml(yaml_config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_PORT", "9002")
    monkeypatch.setenv("TESSERA_WORKER_URLS", "http://a:1, http://b:2")
    monkeypatch.setenv("TESSERA_ATTENTION_DENSE_LAYERS", "0,1,29")
    assert ServerSettings().port == 9002
    assert ServerSettings().worker_urls == ["http://a:1", "http://b:2"]
    assert AttentionSettings().dense_layers == [0, 1, 29]


def test_explicit_values_override_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_PORT", "9002")
    assert ServerSettings(port=9003).port == 9003


def test_defaults_serve_the_embedded_model(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no tessera.yaml here
    monkeypatch.delenv("TESSERA_CONFIG", raising=False)
    settings = ServerSettings()
    assert settings.served_model_name == "smollm2-135m-instruct"
    assert settings.dtype == "float32" and settings.port == 8000


def test_serve_help_documents_every_setting() -> None:
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in ServerSettings.model_fields:
        assert "--" + name.replace("_", "-") in help_text
    for name in AttentionSettings.model_fields:
        assert "--attention-" + name.replace("_", "-") in help_text


def test_dense_method_keeps_every_layer_dense() -> None:
    policy = AttentionSettings(method="dense").layer_policy()
    assert all(policy.pattern_for_layer(i).is_dense for i in range(64))


def test_trianglemix_policy_follows_the_split() -> None:
    policy = AttentionSettings(method="trianglemix", dense_first_layers=2).layer_policy()
    assert policy.pattern_for_layer(1).is_dense
    assert not policy.pattern_for_layer(2).is_dense


def test_unset_split_is_the_one_measured_for_the_model_config() -> None:
    settings = AttentionSettings(method="trianglemix")
    assert settings.layer_policy(SMOLLM2_135M).dense_first_layers == 24
    other = dataclasses.replace(SMOLLM2_135M, num_layers=32)  # same family, other depth
    assert settings.layer_policy(other).dense_first_layers == 16  # the paper's
    assert settings.layer_policy(None).dense_first_layers == 16
    chosen = AttentionSettings(method="trianglemix", dense_first_layers=5)
    assert chosen.layer_policy(SMOLLM2_135M).dense_first_layers == 5


def test_fingerprint_is_read_from_the_model_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 30, "hidden_size": 576,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
    }))
    assert ModelFingerprint.from_config_json(tmp_path / "config.json") == SMOLLM2_135M


def test_split_is_checked_against_the_layer_count() -> None:
    too_deep = AttentionSettings(method="trianglemix", dense_first_layers=31)
    with pytest.raises(ValueError, match="exceeds"):
        too_deep.layer_policy(SMOLLM2_135M).check_layer_count(30)
    outside = AttentionSettings(method="trianglemix", dense_layers=[0, 1, 40])
    with pytest.raises(ValueError, match="outside"):
        outside.layer_policy(SMOLLM2_135M).check_layer_count(30)
    AttentionSettings(method="trianglemix").layer_policy(SMOLLM2_135M).check_layer_count(30)
    AttentionSettings(method="dense").layer_policy(None).check_layer_count(30)
