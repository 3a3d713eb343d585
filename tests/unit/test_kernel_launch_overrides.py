"""The serving settings that override the TriangleMix GPU kernel's launch config.

They came from issue 18's decode-ITL variants (is the side stream or the Gluon kernel what
leaves decode slower? The side stream: gpu_itl_variants.json); the numbers they change are
checked on the GPU in tests/gpu.
"""

import dataclasses

import pytest
from pydantic import ValidationError

from attention_backends.config import AttentionSettings
from attention_backends.kernels.sparse_prefill_triton import (
    GLUON_CONFIG,
    TMA_CONFIG,
    with_overrides,
)


def test_serving_default_runs_the_last_rows_on_the_main_stream():
    # A server that used the high-priority side stream replayed vLLM's decode graphs ~3%
    # slower (gpu_itl_variants.json, 2026-12-01), so serving keeps one stream by default.
    settings = AttentionSettings()
    assert settings.kernel_overlap_last_rows is False and settings.kernel_streaming == "auto"
    config = with_overrides(GLUON_CONFIG, settings.kernel_overlap_last_rows,
                            settings.kernel_streaming)
    assert config.overlap_last_rows is False and config.streaming_kernel == "gluon"


def test_overrides_that_match_the_kernel_default_change_nothing():
    assert with_overrides(GLUON_CONFIG, True, "auto") == GLUON_CONFIG
    assert with_overrides(TMA_CONFIG, True, "auto") == TMA_CONFIG


def test_triton_streaming_takes_the_triton_tiles_not_gluons():
    config = with_overrides(GLUON_CONFIG, True, "triton")
    assert config == TMA_CONFIG and config.streaming_kernel == "triton"
    assert GLUON_CONFIG.block_m != TMA_CONFIG.block_m  # else this test proves nothing


def test_overlap_off_keeps_everything_else():
    config = with_overrides(GLUON_CONFIG, False, "auto")
    assert config.overlap_last_rows is False
    assert dataclasses.replace(config, overlap_last_rows=True) == GLUON_CONFIG


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("TESSERA_ATTENTION_KERNEL_OVERLAP_LAST_ROWS", "0")
    monkeypatch.setenv("TESSERA_ATTENTION_KERNEL_STREAMING", "triton")
    settings = AttentionSettings()
    assert settings.kernel_overlap_last_rows is False and settings.kernel_streaming == "triton"
    monkeypatch.setenv("TESSERA_ATTENTION_KERNEL_STREAMING", "gluon-please")
    with pytest.raises(ValidationError):
        AttentionSettings()
