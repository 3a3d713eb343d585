"""The serving settings that override the TriangleMix GPU kernel's launch config.

They exist for issue 18's decode-ITL variants (is the side stream or the Gluon kernel what
leaves decode slower?); the numbers they change are checked on the GPU in tests/gpu.
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


def test_defaults_leave_the_measured_best_untouched():
    settings = AttentionSettings()
    assert settings.kernel_overlap_last_rows is True and settings.kernel_streaming == "auto"
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
