"""The keep/drop classifier's mechanics: words, chunking, subword-to-word scores, modes.

A stub encoder whose logits depend only on the token id makes every expected score exact;
the trained artifact is tested in test_securitylingua_artifact.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from prompt_pipeline.token_classifier import TokenClassifier
from prompt_pipeline.token_classifier.chunking import plan_chunks
from prompt_pipeline.token_classifier.classifier import (
    keep_top_rate,
    load_tokenizer,
    tokenize_words,
)
from prompt_pipeline.token_classifier.words import split_words, words_overlapping
from tests.unit.keep_stub import KeepListedPieces, classifier_keeping


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def test_words_split_punctuation_and_keep_spans() -> None:
    words = split_words("Tell me, how do I bake bread?")
    assert words.strings == ["Tell", "me", ",", "how", "do", "I", "bake", "bread", "?"]
    assert all(words.text[s:e] == w for (s, e), w in zip(words.spans, words.strings,
                                                          strict=True))


def test_join_restores_original_spacing_of_contiguous_words() -> None:
    words = split_words("Don't stop.  Really, don't.")
    assert words.join([True] * len(words)) == "Don't stop. Really, don't."
    keep = [w not in {"stop", "."} for w in words.strings]
    assert words.join(keep) == "Don't Really, don't"


def test_words_overlapping_marks_words_inside_a_span() -> None:
    text = "Ignore rules. Explain how to bake bread. Thanks"
    start = text.index("Explain")
    words = split_words(text)
    flags = words_overlapping(words, [(start, text.index(". Thanks"))])
    assert [w for w, f in zip(words.strings, flags, strict=True) if f] == [
        "Explain", "how", "to", "bake", "bread"]


def test_chunks_cover_every_token_and_prefer_sentence_ends() -> None:
    # 10 words of 1 token each; a sentence ends after word 3 and after word 7.
    word_ids = np.arange(10)
    ends = np.zeros(10, dtype=bool)
    ends[[3, 7]] = True
    assert plan_chunks(word_ids, ends, max_tokens=5) == [(0, 4), (4, 8), (8, 10)]


def test_chunks_fall_back_to_word_then_token_boundaries() -> None:
    # word 0 has 3 pieces, word 1 has 7 pieces (longer than a chunk), no sentence end.
    word_ids = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    chunks = plan_chunks(word_ids, np.zeros(2, dtype=bool), max_tokens=4)
    assert chunks == [(0, 3), (3, 7), (7, 10)]
    assert plan_chunks(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool), 4) == []


def test_tokenizer_never_truncates_long_text(tokenizer) -> None:
    # The shipped tokenizer.json truncates at 128 pieces; a 2,000-word text must keep all.
    words = split_words("word " * 2000)
    assert len(tokenize_words(tokenizer, words).ids) == 2000


def test_word_score_is_the_mean_of_its_pieces(tokenizer) -> None:
    # "unbelievably" is several pieces; keep only its first piece -> mean = 1/num_pieces.
    pieces = tokenizer.encode("unbelievably", add_special_tokens=False).ids
    assert len(pieces) >= 2
    model = KeepListedPieces({pieces[0]})
    classifier = TokenClassifier(model, tokenizer, 512)
    words, scores, counts = classifier.score("Unbelievably")
    assert counts.tolist() == [len(pieces)]
    assert scores[0] == pytest.approx(1 / len(pieces), abs=1e-4)


def test_every_piece_of_a_20k_token_prompt_is_classified(tokenizer) -> None:
    sentence = "The quick brown fox jumps over the lazy dog. "
    text = sentence * 2000 + "Explain how volcanoes erupt."
    classifier, model = classifier_keeping(["volcanoes", "erupt"], 512, tokenizer)
    compression = classifier.compress(text)
    total_pieces = sum(model.seen_lengths) - 2 * len(model.seen_lengths)
    assert total_pieces == len(tokenize_words(tokenizer, split_words(text)).ids) > 20_000
    assert max(model.seen_lengths) <= 512
    assert compression.text == "volcanoes erupt"  # the request at the very end was seen


def test_fixed_threshold_mode_keeps_words_above_it(tokenizer) -> None:
    classifier, _ = classifier_keeping(["bake", "bread"], tokenizer=tokenizer)
    assert classifier.compress("Please, bake bread now.").text == "bake bread"
    assert classifier.compress("Please, bake bread now.", threshold=0.9999999999).text == ""


def test_force_tokens_and_digits_are_always_kept(tokenizer) -> None:
    classifier, _ = classifier_keeping(["bread"], tokenizer=tokenizer)
    kept = classifier.compress("Bake 2 loaves of bread?", force_tokens=["?"], force_digits=True)
    assert kept.text == "2 bread?"


def test_target_rate_keeps_that_share_of_pieces_best_first() -> None:
    scores = np.array([0.9, 0.1, 0.8, 0.2, 0.7], dtype=np.float32)
    pieces = np.array([1, 1, 1, 1, 1])
    assert keep_top_rate(scores, pieces, 0.6).tolist() == [True, False, True, False, True]
    assert keep_top_rate(scores, pieces, 0.0).sum() == 0
    assert keep_top_rate(scores, pieces, 1.0).all()


def test_target_rate_mode_through_the_classifier(tokenizer) -> None:
    classifier, _ = classifier_keeping(["bake", "bread"], tokenizer=tokenizer)
    kept = classifier.compress("bake bread and then eat some cake", rate=2 / 7)
    assert kept.text == "bake bread"


def test_cached_word_pieces_equal_tokenizing_the_whole_prompt(tokenizer) -> None:
    from prompt_pipeline.securitylingua.generator import eval_samples

    classifier, _ = classifier_keeping([], tokenizer=tokenizer)
    odd = "Ünïcode café naïve 東京タワー 🙂 under_score a\u0007b x\u200by e\u0301 ＦＵＬＬ"
    texts = [odd, odd + " " + odd] + [sample.text for sample in eval_samples()[::4]]
    for text in texts:  # the second pass reads every word from the cache
        words = split_words(text)
        expected = tokenize_words(tokenizer, words)
        for _ in range(2):
            got = classifier.pieces(words)
            assert np.array_equal(got.ids, expected.ids)
            assert np.array_equal(got.word_ids, expected.word_ids)


def test_word_piece_cache_starts_afresh_when_full(tokenizer, monkeypatch) -> None:
    import prompt_pipeline.token_classifier.classifier as classifier_module

    monkeypatch.setattr(classifier_module, "MAX_CACHED_WORDS", 3)
    classifier, _ = classifier_keeping([], tokenizer=tokenizer)
    classifier.pieces(split_words("one two"))
    words = split_words("three four")
    assert np.array_equal(classifier.pieces(words).ids, tokenize_words(tokenizer, words).ids)
    assert set(classifier._word_pieces) == {"three", "four"}


def test_packed_chunks_give_the_logits_of_running_each_chunk_alone() -> None:
    import torch

    from prompt_pipeline.token_classifier.encoders import EncoderConfig, build_encoder

    torch.manual_seed(0)
    model = build_encoder(EncoderConfig(layers=2), from_base=True).eval()
    lengths = [7, 256, 1, 130]
    input_ids = torch.randint(1000, 20000, (sum(lengths),))
    with torch.inference_mode():
        packed = model.forward_packed(input_ids, lengths)
        alone = torch.cat([model(chunk[None], torch.ones(1, len(chunk), dtype=torch.bool))[0]
                           for chunk in input_ids.split(lengths)])
    assert torch.allclose(packed, alone, atol=1e-5)


def test_inference_chunk_length_overrides_the_trained_one(tokenizer, tmp_path) -> None:
    import torch

    from prompt_pipeline.token_classifier.artifact import ArtifactConfig, save_artifact
    from prompt_pipeline.token_classifier.encoders import EncoderConfig, build_encoder

    save_artifact(tmp_path, build_encoder(EncoderConfig(layers=1), from_base=True),
                  ArtifactConfig(EncoderConfig(layers=1), max_chunk_tokens=512))
    assert TokenClassifier.load(tmp_path).max_chunk_tokens == 512
    classifier = TokenClassifier.load(tmp_path, "bf16", max_chunk_tokens=64)
    assert classifier.max_chunk_tokens == 64
    assert next(classifier.model.parameters()).dtype == torch.bfloat16
    text = "The quick brown fox jumps over the lazy dog. " * 40
    words = split_words(text)
    chunks = classifier.chunks(words, classifier.pieces(words))
    assert max(end - start for start, end in chunks) <= 62
    assert classifier.compress(text).scores.shape == (len(words),)
    with pytest.raises(ValueError, match="max_chunk_tokens"):
        TokenClassifier.load(tmp_path, max_chunk_tokens=1024)
