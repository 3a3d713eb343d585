"""Where the SecurityLingua extractor's time goes on a ~1K-token prompt, 1 torch thread.

Each part alone, median of `--repeats` rounds of `--runs` calls (variants interleaved in a
round): tokenizing the words (every word new vs remembered), the encoder on the prompt's
chunks (512- vs 256-piece chunks; fp32 / bf16 / int8; chunk by chunk vs packed end to end),
one attention call (fp32 vs bf16), `compress()` whole, and block mode's harm classifier on
the extracted intention. The numbers behind
benchmarks/securitylingua_NOTES.md.

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/securitylingua_profile.py
Writes benchmarks/results/securitylingua_profile.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.securitylingua_overhead import prompt_of  # noqa: E402
from prompt_pipeline.securitylingua.artifacts import (  # noqa: E402
    DEFAULT_EXTRACTOR_DIR,
    FULL_HARM_CLASSIFIER,
)
from prompt_pipeline.securitylingua.harm import HarmClassifier  # noqa: E402
from prompt_pipeline.token_classifier import TokenClassifier  # noqa: E402
from prompt_pipeline.token_classifier.classifier import (  # noqa: E402
    SPECIAL_TOKENS,
    bf16_is_native,
    tokenize_words,
)
from prompt_pipeline.token_classifier.words import split_words  # noqa: E402
from server.config import ServerSettings  # noqa: E402
from server.launcher import resolve_model_path  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    counter = Tokenizer.from_file(str(resolve_model_path(ServerSettings()) / "tokenizer.json"))
    text = prompt_of(1000, counter)
    words = split_words(text)
    classifiers = {precision: TokenClassifier.load(DEFAULT_EXTRACTOR_DIR, precision)
                   for precision in (None, "bf16", "int8")}
    fp32 = classifiers[None]
    pieces = fp32.pieces(words)

    def chunk_lengths(max_chunk_tokens: int) -> list[int]:
        fp32.max_chunk_tokens = max_chunk_tokens
        chunks = fp32.chunks(words, pieces)
        return [end - start + SPECIAL_TOKENS for start, end in chunks]

    def cold_pieces() -> None:
        fp32._word_pieces = {}
        fp32.pieces(words)

    cases: dict[str, Callable[[], object]] = {
        "tokenize: tokenize_words (every call, before)": lambda: tokenize_words(
            fp32.tokenizer, words),
        "tokenize: pieces(), cache cold": cold_pieces,
        "tokenize: pieces(), cache warm": lambda: fp32.pieces(words),
    }
    for max_chunk_tokens in (512, 256):
        lengths = chunk_lengths(max_chunk_tokens)
        ids = torch.randint(1000, 20000, (sum(lengths),))
        for precision, classifier in classifiers.items():
            model = classifier.model
            label = f"encoder {max_chunk_tokens}-piece chunks {lengths}, {precision or 'fp32'}"
            cases[f"{label}, chunk by chunk"] = lambda model=model, ids=ids, lengths=lengths: [
                model(chunk[None], torch.ones(1, len(chunk), dtype=torch.bool))
                for chunk in ids.split(lengths)]
            cases[f"{label}, packed"] = lambda model=model, ids=ids, lengths=lengths: \
                model.forward_packed(ids, lengths)
    for length in (512, 256):
        query = torch.randn(1, 4, length, 32)
        for dtype in (torch.float32, torch.bfloat16):
            cast = query.to(dtype)
            cases[f"attention 4 heads x {length} x 32, {dtype}"] = lambda cast=cast: \
                torch.nn.functional.scaled_dot_product_attention(cast, cast, cast)
    for precision, classifier in classifiers.items():
        cases[f"compress() whole, {classifier.max_chunk_tokens}-piece chunks, "
              f"{precision or 'fp32'}, word cache warm"] = lambda c=classifier: c.compress(text)
    fp32.max_chunk_tokens = classifiers["bf16"].max_chunk_tokens
    # Block mode adds the harm classifier (full MiniLM-L6 on the intention) to the stage.
    harm = HarmClassifier.load(FULL_HARM_CLASSIFIER)
    intention = classifiers["bf16"].compress(text).text
    cases[f"block mode: harm classifier on the intention ({len(intention.split())} words)"] = \
        lambda: harm.probability(intention)

    rounds: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for case in cases.values():
            for _ in range(3):
                case()
        for round_index in range(args.repeats):
            for name, case in cases.items():
                samples = []
                for _ in range(args.runs):
                    started = time.perf_counter()
                    case()
                    samples.append((time.perf_counter() - started) * 1e3)
                rounds[name].append(statistics.median(samples))
            print(f"round {round_index + 1}/{args.repeats}", flush=True)
    report = {"script": "benchmarks/securitylingua_profile.py", "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "cpu_bf16_native": bf16_is_native(), "threads": 1,
              "prompt_words": len(words), "prompt_pieces": len(pieces.ids),
              "runs_per_round": args.runs, "rounds": args.repeats,
              "median_ms": {name: round(statistics.median(values), 3)
                            for name, values in rounds.items()},
              "per_round_ms": {name: [round(v, 3) for v in values]
                               for name, values in rounds.items()}}
    for name, value in report["median_ms"].items():
        print(f"{value:8.3f} ms  {name}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "securitylingua_profile.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
