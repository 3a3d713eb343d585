"""Train the compressor of SeCom's retrieval keys (issue 21): the shared token classifier
(compact encoder) on rule labels (`prompt_pipeline/secom/key_labels.py`) over generated
conversations. Training corpus seed 7 (60 conversations), held-out seed 8 (10); the
retrieval and end-to-end benchmarks use seeds 0 and 1. Writes the artifact to
`prompt_pipeline/secom/artifacts/keys-compact/` and the held-out keep/drop F1 next to it.

    flock -x /tmp/tessera-cpu-timing.lock .venv/bin/python benchmarks/secom_train_keys.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from secom_corpus import make_corpus  # noqa: E402

from prompt_pipeline.secom.key_labels import (  # noqa: E402
    ARTIFACT_DIR,
    document_frequency,
    labelled,
)
from prompt_pipeline.secom.memory import exchange_text  # noqa: E402
from prompt_pipeline.securitylingua.train import TrainConfig, train  # noqa: E402
from prompt_pipeline.token_classifier.encoders import EncoderConfig  # noqa: E402

MAX_DF = 0.15  # the generic assistant replies sit at 19-25% of exchanges, topic words <= 9%


def unit_texts(corpus: list) -> list[str]:
    """What the classifier compresses at serving time: turns and topic segments."""
    texts = []
    for conversation in corpus:
        exchanges = [exchange_text(u, a) for u, a in conversation.exchanges]
        texts += exchanges
        texts += ["\n".join(exchanges[a : b + 1]) for a, b in conversation.true_segments()]
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=ARTIFACT_DIR)
    args = parser.parse_args()
    train_corpus, held_corpus = make_corpus(60, seed=7), make_corpus(10, seed=8)
    df = document_frequency(exchange_text(u, a) for c in train_corpus for u, a in c.exchanges)
    samples, held_out = (labelled(unit_texts(c), df, MAX_DF)
                         for c in (train_corpus, held_corpus))
    kept = sum(len(s.spans) for s in samples)
    words = sum(len(s.text.split()) for s in samples)
    print(f"{len(samples)} training texts; the rule keeps ~{kept / words:.0%} of words")
    result = train(TrainConfig(out_dir=args.out, encoder=EncoderConfig(), epochs=args.epochs,
                               batch_tokens=1024, threads=2), samples, held_out)
    result["label_rule"] = {"max_df": MAX_DF, "kept_word_share": round(kept / words, 3),
                            "train_corpus_seed": 7, "held_out_seed": 8}
    (args.out / "train_result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
