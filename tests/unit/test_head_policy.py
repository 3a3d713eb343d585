"""The per-(layer, head) config: format, refusals, and the backend settings that load it."""

import json

import pytest

from attention_backends.config import AttentionSettings
from attention_backends.patterns.minference import (
    DenseHead,
    LayerHeadPatterns,
    TriangleHead,
    VerticalSlashHead,
)
from attention_backends.patterns.minference.policy import (
    HeadPatternPolicy,
    committed_config,
    uniform_policy,
)
from attention_backends.policy import SMOLLM2_135M, ModelFingerprint

TINY = ModelFingerprint("LlamaForCausalLM", 3, 64, 2, 1, 100)


def tiny_policy():
    layers = (LayerHeadPatterns((DenseHead(), DenseHead())),
              LayerHeadPatterns((VerticalSlashHead(40, 120), DenseHead())),
              LayerHeadPatterns((TriangleHead(4, 32, 8),) * 2))
    return HeadPatternPolicy(TINY, layers)


def test_json_round_trip(tmp_path):
    path = tmp_path / "tiny.json"
    recalls = [[1, 1], [0.9, 1], [0.8, 0.7]]
    path.write_text(json.dumps(tiny_policy().to_json({"by": "test"}, recalls)))
    loaded = HeadPatternPolicy.load(path, TINY)
    assert loaded == tiny_policy()
    assert json.loads(path.read_text())["layers"][1][0] == {
        "pattern": "vertical_slash", "recall": 0.9,
        "params": {"vertical_size": 40, "slash_size": 120, "last_q_tokens": 64,
                   "sink_tokens": 30, "local_tokens": 100}}


def test_all_dense_layers_run_the_dense_pattern():
    policy = tiny_policy()
    assert policy.pattern_for_layer(0).is_dense
    assert policy.sparse_layers(3) == [1, 2]
    assert policy.pattern_for_layer(2).heads[0] == TriangleHead(4, 32, 8)


def test_a_config_for_another_model_is_refused(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_policy().to_json()))
    with pytest.raises(ValueError, match="written for"):
        HeadPatternPolicy.load(path, SMOLLM2_135M)


def test_wrong_head_or_layer_counts_are_refused():
    values = tiny_policy().to_json()
    values["layers"][0].append({"pattern": "dense"})
    with pytest.raises(ValueError, match="heads"):
        HeadPatternPolicy.from_json(values)
    values = tiny_policy().to_json()
    values["layers"].pop()
    with pytest.raises(ValueError, match="layers"):
        HeadPatternPolicy.from_json(values)


def test_trianglemix_split_is_a_config():
    policy = uniform_policy(TINY, lambda layer: DenseHead() if layer < 2 else TriangleHead())
    assert policy.sparse_layers(3) == [2]


def test_settings_load_a_given_file(tmp_path, monkeypatch):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_policy().to_json()))
    monkeypatch.setenv("TESSERA_ATTENTION_METHOD", "minference")
    monkeypatch.setenv("TESSERA_ATTENTION_HEAD_PATTERNS_FILE", str(path))
    assert AttentionSettings().layer_policy(TINY) == tiny_policy()


def test_settings_find_the_committed_config_by_fingerprint(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_policy().to_json()))
    assert committed_config(TINY, tmp_path) == path
    with pytest.raises(FileNotFoundError):
        committed_config(SMOLLM2_135M, tmp_path)
