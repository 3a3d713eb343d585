"""A deterministic stand-in encoder for unit tests of code around the classifier."""

from __future__ import annotations

import torch

from prompt_pipeline.token_classifier import TokenClassifier
from prompt_pipeline.token_classifier.classifier import load_tokenizer


class KeepListedPieces(torch.nn.Module):
    """Logits (0, +20) for listed piece ids (P(keep) ~ 1), (0, -20) otherwise; records the
    length of every chunk it is given."""

    def __init__(self, keep_ids: set[int]) -> None:
        super().__init__()
        self.keep_ids = keep_ids
        self.seen_lengths: list[int] = []

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.seen_lengths.append(int(mask.sum()))
        keep = torch.tensor([[i in self.keep_ids for i in row] for row in input_ids.tolist()])
        return torch.stack([torch.zeros(keep.shape), torch.where(keep, 20.0, -20.0)], dim=-1)


def classifier_keeping(words: list[str], max_chunk_tokens: int = 512,
                       tokenizer=None) -> tuple[TokenClassifier, KeepListedPieces]:
    """A classifier that keeps exactly the pieces of `words` (lower-cased by MiniLM)."""
    tokenizer = tokenizer or load_tokenizer()
    ids = {i for word in words for i in tokenizer.encode(word, add_special_tokens=False).ids}
    model = KeepListedPieces(ids)
    return TokenClassifier(model, tokenizer, max_chunk_tokens), model
