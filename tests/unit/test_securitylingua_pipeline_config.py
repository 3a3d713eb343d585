"""`pipeline:` in tessera.yaml builds the stages; a failing stage fails open or closed as
configured, and that decision is counted."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from prompt_pipeline.config import PipelineSettings, build_stages
from prompt_pipeline.errors import PipelineError
from prompt_pipeline.guard import GuardedStage
from prompt_pipeline.securitylingua.stage import SecurityLinguaStage
from prompt_pipeline.stage import Pipeline, RequestContext
from server.schemas import ChatCompletionRequest


def request() -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "Explain how to bake bread."}]})


def failures(registry: CollectorRegistry, decision: str) -> float:
    value = registry.get_sample_value("tessera_pipeline_stage_failures_total",
                                      {"stage": "securitylingua", "decision": decision})
    return value or 0.0


def test_yaml_pipeline_section_builds_the_securitylingua_stage(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "tessera.yaml"
    config.write_text("pipeline:\n  stages: [securitylingua]\n  on_failure: open\n"
                      "  securitylingua:\n    threshold: 0.7\n    turns: all\n")
    monkeypatch.setenv("TESSERA_CONFIG", str(config))
    settings = PipelineSettings()
    assert settings.securitylingua.threshold == 0.7
    [stage] = build_stages(settings, CollectorRegistry())
    assert isinstance(stage, GuardedStage) and stage.decision == "open"
    assert isinstance(stage.stage, SecurityLinguaStage)
    assert stage.stage.settings.turns == "all"


def test_default_extractor_is_bf16_where_native_with_256_piece_chunks() -> None:
    import torch

    from prompt_pipeline.securitylingua.stage import extractor_precision
    from prompt_pipeline.token_classifier.classifier import bf16_is_native

    [stage] = build_stages(PipelineSettings(stages=["securitylingua"]), CollectorRegistry())
    extractor = stage.stage.extractor
    assert extractor.max_chunk_tokens == 256
    expected = torch.bfloat16 if bf16_is_native() else torch.float32
    assert next(extractor.model.parameters()).dtype == expected
    assert extractor_precision("none") is None and extractor_precision("int8") == "int8"
    assert extractor_precision("auto") == ("bf16" if bf16_is_native() else None)


def test_env_overrides_a_nested_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TESSERA_CONFIG", raising=False)
    monkeypatch.setenv("TESSERA_PIPELINE_SECURITYLINGUA__MODE", "block")
    monkeypatch.setenv("TESSERA_PIPELINE_STAGES", '["securitylingua"]')
    settings = PipelineSettings()
    assert settings.stages == ["securitylingua"] and settings.securitylingua.mode == "block"


def test_unknown_stage_name_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="unknown pipeline stage"):
        build_stages(PipelineSettings(stages=["nope"]), CollectorRegistry())


def missing_model(tmp_path: Path, on_failure: str) -> PipelineSettings:
    return PipelineSettings(stages=["securitylingua"], on_failure=on_failure,
                            securitylingua={"artifact_dir": tmp_path / "absent"})


async def test_missing_model_fails_closed_with_a_503(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    pipeline = Pipeline(build_stages(missing_model(tmp_path, "closed"), registry))
    with pytest.raises(PipelineError) as raised:
        await pipeline.run(request(), RequestContext(request_id="r", route="chat"))
    assert (raised.value.status_code, raised.value.type) == (503, "server_error")
    assert raised.value.code == "pipeline_stage_unavailable"
    assert failures(registry, "closed") == 1


async def test_missing_model_fails_open_forwarding_unchanged_and_counted(
        tmp_path: Path) -> None:
    registry = CollectorRegistry()
    pipeline = Pipeline(build_stages(missing_model(tmp_path, "open"), registry))
    original = request()
    out = await pipeline.run(original, RequestContext(request_id="r", route="chat"))
    assert out is original
    assert failures(registry, "open") == 1


async def test_per_stage_decision_overrides_the_default(tmp_path: Path) -> None:
    settings = missing_model(tmp_path, "closed")
    settings.on_failure_per_stage = {"securitylingua": "open"}
    [stage] = build_stages(settings, CollectorRegistry())
    assert stage.decision == "open"


async def test_an_exception_inside_a_working_stage_is_a_failure_too() -> None:
    class Broken:
        name = "securitylingua"

        async def __call__(self, request, context):
            raise ValueError("boom")

    registry = CollectorRegistry()
    from prometheus_client import Counter
    counter = Counter("tessera_pipeline_stage_failures", "t", ["stage", "decision"],
                      registry=registry)
    with pytest.raises(PipelineError):
        await GuardedStage(Broken(), "closed", counter)(request(), RequestContext("r", "chat"))
    assert failures(registry, "closed") == 1


def test_a_config_file_without_a_pipeline_section_means_no_stages(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from server.config import ServerSettings

    only_server = tmp_path / "server-only.yaml"
    only_server.write_text("server:\n  port: 9001\n")
    monkeypatch.setenv("TESSERA_CONFIG", str(only_server))
    assert PipelineSettings().stages == []
    only_pipeline = tmp_path / "pipeline-only.yaml"
    only_pipeline.write_text("pipeline:\n  stages: [securitylingua]\n")
    monkeypatch.setenv("TESSERA_CONFIG", str(only_pipeline))
    assert ServerSettings().port == 8000
