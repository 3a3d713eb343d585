"""LLMLingua-2-style keep/drop scoring of a text, word by word.

Pipeline (LLMLingua-2, section 3.3 of its paper; SecurityLingua reuses it unchanged):
1. split into words (`words.py`) and word pieces (MiniLM's tokenizer, never truncating);
2. cut the pieces into chunks of <= max_chunk_tokens - 2 at sentence ends (`chunking.py`);
3. P(keep) per piece from the encoder; a word's score is the mean over its pieces;
4. force tokens (and, optionally, words with digits) score 1.0;
5. keep words with P(keep) > threshold (SecurityLingua: 0.5), or, in target-rate mode, the
   highest-scoring words until `rate` of the pieces are kept (LLMLingua-2's percentile rule,
   counted in the encoder's pieces instead of GPT tokens, which would need tiktoken).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from prompt_pipeline.token_classifier.artifact import load_artifact
from prompt_pipeline.token_classifier.chunking import plan_chunks
from prompt_pipeline.token_classifier.encoders import MAX_POSITIONS, base_encoder_dir
from prompt_pipeline.token_classifier.words import Words, split_words

SPECIAL_TOKENS = 2  # [CLS] and [SEP] around every chunk
MAX_CACHED_WORDS = 200_000  # distinct words whose pieces a classifier remembers (~40 MB)


def load_tokenizer() -> Tokenizer:
    """MiniLM's WordPiece tokenizer with its shipped 128-token truncation and padding off:
    those defaults would silently cut long prompts."""
    tokenizer = Tokenizer.from_file(str(base_encoder_dir() / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def bf16_is_native() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AVX512-BF16 or AMX), as
    torch itself reports it. Without, oneDNN emulates bf16 and it is slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


@dataclass(frozen=True)
class Pieces:
    """A text's word pieces: ids [num_pieces] int64, word_ids [num_pieces] int64."""

    ids: np.ndarray
    word_ids: np.ndarray

    def pieces_per_word(self, num_words: int) -> np.ndarray:
        return np.bincount(self.word_ids, minlength=num_words)


def tokenize_words(tokenizer: Tokenizer, words: Words) -> Pieces:
    if len(words) == 0:
        return Pieces(np.zeros(0, np.int64), np.zeros(0, np.int64))
    encoding = tokenizer.encode(words.strings, is_pretokenized=True, add_special_tokens=False)
    return Pieces(np.asarray(encoding.ids, dtype=np.int64),
                  np.asarray(encoding.word_ids, dtype=np.int64))


@dataclass(frozen=True)
class Compression:
    words: Words
    scores: np.ndarray  # [num_words] float32, P(keep)
    keep: np.ndarray  # [num_words] bool

    @property
    def text(self) -> str:
        return self.words.join(self.keep.tolist())

    @property
    def kept_words(self) -> int:
        return int(self.keep.sum())


class TokenClassifier:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer,
                 max_chunk_tokens: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_chunk_tokens = max_chunk_tokens
        self.cls_id = tokenizer.token_to_id("[CLS]")
        self.sep_id = tokenizer.token_to_id("[SEP]")
        self._word_pieces: dict[str, list[int]] = {}  # word -> its piece ids (see `pieces`)

    @classmethod
    def load(cls, directory: Path | str, quantize: str | None = None,
             max_chunk_tokens: int | None = None) -> TokenClassifier:
        """quantize="int8": dynamic int8 quantization of every Linear layer (weights int8,
        activations quantized per batch). quantize="bf16": weights and activations in
        bfloat16 (attention in fp32), ~3.5x faster linear layers on a CPU with native bf16
        (`bf16_is_native()`), slower where it is emulated. Their F1 cost is measured in
        benchmarks/securitylingua_extraction.py.

        max_chunk_tokens: chunk length at inference (including [CLS] and [SEP]); None = the
        length the artifact was trained with. Shorter chunks cost less attention (quadratic
        in the chunk) and give each word less context."""
        model, config = load_artifact(Path(directory))
        if quantize == "int8":
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear},
                                                           dtype=torch.qint8)
        elif quantize == "bf16":
            model = model.to(torch.bfloat16)
        elif quantize is not None:
            raise ValueError(f"unknown quantization {quantize!r}")
        chunk_tokens = max_chunk_tokens or config.max_chunk_tokens
        if not SPECIAL_TOKENS < chunk_tokens <= MAX_POSITIONS:
            raise ValueError(f"max_chunk_tokens must be in ({SPECIAL_TOKENS}, {MAX_POSITIONS}]")
        return cls(model, load_tokenizer(), chunk_tokens)

    def pieces(self, words: Words) -> Pieces:
        """`tokenize_words`, with each distinct word's pieces remembered: the tokenizer costs
        ~2.4 ms per 1K words, the lookups ~0.2 ms. Exact: with pre-tokenized input the
        tokenizer normalises and splits each word on its own, so a word's pieces do not depend
        on its neighbours (tests/unit/test_token_classifier.py checks it on held-out prompts).
        Words not seen before cost what `tokenize_words` costs."""
        strings = words.strings
        known = self._word_pieces
        missing = [word for word in dict.fromkeys(strings) if word not in known]
        if missing:
            if len(known) + len(missing) > MAX_CACHED_WORDS:
                # A fresh dict, not clear(): another thread may be reading the old one.
                known = self._word_pieces = {}
            # One call for all new words, the call `tokenize_words` makes for all words.
            encoding = self.tokenizer.encode(missing, is_pretokenized=True,
                                             add_special_tokens=False)
            new_pieces: list[list[int]] = [[] for _ in missing]
            for piece_id, word_index in zip(encoding.ids, encoding.word_ids, strict=True):
                new_pieces[word_index].append(piece_id)
            known.update(zip(missing, new_pieces, strict=True))
        per_word = [known[word] for word in strings]
        counts = np.fromiter(map(len, per_word), dtype=np.int64, count=len(per_word))
        ids = np.fromiter(chain.from_iterable(per_word), dtype=np.int64, count=int(counts.sum()))
        return Pieces(ids, np.repeat(np.arange(len(per_word), dtype=np.int64), counts))

    def chunks(self, words: Words, pieces: Pieces) -> list[tuple[int, int]]:
        ends = np.asarray(words.sentence_ends(), dtype=bool)
        return plan_chunks(pieces.word_ids, ends, self.max_chunk_tokens - SPECIAL_TOKENS)

    def piece_probs(self, pieces: Pieces, chunks: list[tuple[int, int]]) -> np.ndarray:
        """P(keep) for every piece, [num_pieces] float32.

        No chunk is padded: on a CPU padding is only extra work, and an unmasked attention
        takes the fused fast path. A model with `forward_packed` (the compact encoder) gets
        all chunks at once, end to end, and runs each linear layer once over all of them;
        any other model runs chunk by chunk."""
        probs = np.zeros(len(pieces.ids), dtype=np.float32)
        if not chunks:
            return probs
        with torch.inference_mode():
            if hasattr(self.model, "forward_packed"):
                return self._packed_probs(pieces, chunks)
            for start, end in chunks:
                input_ids = torch.empty((1, end - start + SPECIAL_TOKENS), dtype=torch.long)
                input_ids[0, 0] = self.cls_id
                input_ids[0, 1:-1] = torch.from_numpy(pieces.ids[start:end])
                input_ids[0, -1] = self.sep_id
                mask = torch.ones_like(input_ids, dtype=torch.bool)
                logits = self.model(input_ids, mask)[0, 1:-1].float()
                probs[start:end] = torch.softmax(logits, dim=-1)[:, 1].numpy()
        return probs

    def _packed_probs(self, pieces: Pieces, chunks: list[tuple[int, int]]) -> np.ndarray:
        lengths = [end - start + SPECIAL_TOKENS for start, end in chunks]
        input_ids = np.empty(sum(lengths), dtype=np.int64)
        is_piece = np.ones(len(input_ids), dtype=bool)  # False at each [CLS] and [SEP]
        offset = 0
        for (start, end), length in zip(chunks, lengths, strict=True):
            input_ids[offset] = self.cls_id
            input_ids[offset + 1:offset + length - 1] = pieces.ids[start:end]
            input_ids[offset + length - 1] = self.sep_id
            is_piece[[offset, offset + length - 1]] = False
            offset += length
        logits = self.model.forward_packed(torch.from_numpy(input_ids), lengths)
        probs = torch.softmax(logits.float(), dim=-1)[:, 1].numpy()
        return probs[is_piece]

    def score(self, text: str) -> tuple[Words, np.ndarray, np.ndarray]:
        """Words, their P(keep) [num_words] float32 and piece counts [num_words] int64.
        A word with no piece (e.g. a lone control character) scores 0."""
        words = split_words(text)
        pieces = self.pieces(words)
        probs = self.piece_probs(pieces, self.chunks(words, pieces))
        counts = pieces.pieces_per_word(len(words))
        sums = np.bincount(pieces.word_ids, weights=probs, minlength=len(words))
        scores = np.divide(sums, counts, out=np.zeros(len(words)), where=counts > 0)
        return words, scores.astype(np.float32), counts

    def compress(self, text: str, *, threshold: float = 0.5, rate: float | None = None,
                 force_tokens: Iterable[str] = (), force_digits: bool = False) -> Compression:
        """Fixed-threshold mode (rate=None): keep words with P(keep) > threshold.
        Target-rate mode: keep about `rate` of the word pieces, highest scores first."""
        words, scores, counts = self.score(text)
        scores = apply_force(words, scores, set(force_tokens), force_digits)
        if rate is None:
            keep = scores > threshold
        else:
            keep = keep_top_rate(scores, counts, rate)
        return Compression(words, scores, keep)


def apply_force(words: Words, scores: np.ndarray, force_tokens: set[str],
                force_digits: bool) -> np.ndarray:
    if not force_tokens and not force_digits:
        return scores
    forced = scores.copy()
    for index, word in enumerate(words.strings):
        if word in force_tokens or (force_digits and any(ch.isdigit() for ch in word)):
            forced[index] = 1.0
    return forced


def keep_top_rate(scores: np.ndarray, pieces_per_word: np.ndarray, rate: float) -> np.ndarray:
    """Keep the highest-scoring words until `rate` of all pieces are kept (ties: earlier
    word first). rate in [0, 1]."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError("rate must be in [0, 1]")
    order = np.lexsort((np.arange(len(scores)), -scores))
    budget = rate * pieces_per_word.sum()
    kept_before = np.cumsum(pieces_per_word[order]) - pieces_per_word[order]
    keep = np.zeros(len(scores), dtype=bool)
    keep[order[kept_before < budget]] = True
    return keep
