"""Training is seeded and resumable: an interrupted run, resumed, ends where an
uninterrupted one does; a checkpoint from other data is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prompt_pipeline.securitylingua.train import TrainConfig, train
from prompt_pipeline.token_classifier.encoders import EncoderConfig

TINY = EncoderConfig(layers=1, hidden=32, heads=2, ffn=64)


def config(out: Path, **extra) -> TrainConfig:
    return TrainConfig(out_dir=out, encoder=TINY, epochs=2, batch_tokens=2048, train_limit=60,
                       eval_limit=5, checkpoint_every=1000, threads=1, **extra)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "weights.safetensors"))


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    train(config(tmp_path / "straight"))
    stopped = train(config(tmp_path / "resumed", stop_after_steps=3))
    assert stopped == {"stopped_at_step": 3}
    assert (tmp_path / "resumed" / "checkpoint.pt").exists()
    train(config(tmp_path / "resumed"))
    assert not (tmp_path / "resumed" / "checkpoint.pt").exists()
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(straight[key], resumed[key], rtol=0, atol=0)


def test_a_checkpoint_from_other_data_is_not_resumed(tmp_path: Path) -> None:
    train(config(tmp_path, stop_after_steps=1))
    with pytest.raises(RuntimeError, match="other data or settings"):
        train(config(tmp_path, seed=7))
