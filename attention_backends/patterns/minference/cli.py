"""``tessera patterns search --model DIR``: the offline per-head search on local long text.

Texts (seeded): a prose text cut from license files that the fidelity benchmarks do not use
(they use GPL-3, GFDL-1.3, LGPL-2.1), and a repeat text (a passage followed by itself: the
long-range copying that retrieval needs, in place of MInference's KV-retrieval sample).
Writes the per-(layer, head) config (``policy.py``'s format) with every candidate's recall.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import torch

SEARCH_SOURCES = ("/usr/share/common-licenses/Apache-2.0", "/usr/share/common-licenses/MPL-2.0",
                  "/usr/share/common-licenses/GPL-2", "/usr/share/common-licenses/Artistic",
                  "/usr/share/common-licenses/MPL-1.1")


def search_texts(tokenizer, num_tokens: int, seed: int) -> dict[str, list[int]]:
    """{"prose": ids, "repeat": ids}, each ``num_tokens`` long (BOS-less token ids)."""
    rng = random.Random(seed)
    sources = [s for s in SEARCH_SOURCES if Path(s).exists()]
    if not sources:
        raise FileNotFoundError(f"none of {SEARCH_SOURCES} exists on this machine")
    rng.shuffle(sources)
    corpus = tokenizer("\n\n".join(Path(s).read_text() for s in sources),
                       add_special_tokens=False)["input_ids"]
    while len(corpus) < 2 * num_tokens:
        corpus = corpus + corpus
    start = rng.randrange(0, len(corpus) - num_tokens)
    half = num_tokens // 2
    passage_start = rng.randrange(0, len(corpus) - half)
    passage = corpus[passage_start : passage_start + half]
    return {"prose": corpus[start : start + num_tokens],
            "repeat": (passage + passage + passage)[:num_tokens]}


def run_search(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from attention_backends.patterns.minference.hf_model import (
        capture_queries_keys,
        load_model,
    )
    from attention_backends.patterns.minference.policy import HeadPatternPolicy
    from attention_backends.patterns.minference.search import (
        choose_patterns,
        default_candidates,
        head_recalls,
    )
    from attention_backends.policy import ModelFingerprint

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    began = time.time()
    model, tokenizer = load_model(args.model)
    fingerprint = ModelFingerprint.from_config_json(args.model / "config.json")
    texts = search_texts(tokenizer, args.tokens, args.seed)
    candidates = default_candidates(args.tokens, args.block_size)
    recall_from_row = args.tokens // 4
    per_text: list[list[torch.Tensor]] = []
    progress = tqdm(total=len(texts) * fingerprint.num_layers, desc="patterns search",
                    unit="layer", file=sys.stderr)
    for name, ids in texts.items():
        progress.set_postfix(text=name)
        layers = capture_queries_keys(model, ids)
        recalls = []
        for query, keys, scale in layers:
            recalls.append(head_recalls(query, keys, scale, candidates, args.block_size,
                                        recall_from_row))
            progress.update(1)
        per_text.append(recalls)
    progress.close()
    mean_recalls = [torch.stack(by_text).mean(dim=0) for by_text in zip(*per_text, strict=True)]
    result = choose_patterns(mean_recalls, candidates, args.min_recall, args.block_size)
    policy = HeadPatternPolicy(fingerprint, result.layers)
    source = {
        "command": "tessera patterns search " + " ".join(sys.argv[3:]),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "model_dir": str(args.model),
        "tokens": args.tokens, "seed": args.seed, "min_recall": args.min_recall,
        "recall_from_row": recall_from_row,
        "texts": {name: {"tokens": len(ids), "sha256_of_ids": hashlib.sha256(
            json.dumps(ids).encode()).hexdigest()} for name, ids in texts.items()},
        "sources": list(SEARCH_SOURCES),
        "candidates": [{"pattern": c.name, "params": c.params()} for c in candidates],
        "candidate_recalls": [[[round(r, 5) for r in head] for head in layer]
                              for layer in result.candidate_recalls],
        "seconds": round(time.time() - began, 1),
    }
    values = policy.to_json(source, result.best_recall)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(values, indent=1) + "\n")
    return values


def _cmd_search(args: argparse.Namespace) -> int:
    if args.out is None:
        from attention_backends.patterns.minference.policy import CONFIG_DIR

        args.out = CONFIG_DIR / f"{args.model.name}.json"
    values = run_search(args)
    kinds: dict[str, int] = {}
    for layer in values["layers"]:
        for head in layer:
            kinds[head["pattern"]] = kinds.get(head["pattern"], 0) + 1
    print(f"wrote {args.out}: {kinds}")
    return 0


def add_patterns_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("patterns", help="sparse attention patterns (MInference)")
    parser.set_defaults(config=None)  # `tessera` reads args.config for every command
    sub = parser.add_subparsers(dest="patterns_command", required=True)
    search = sub.add_parser("search", help="offline per-(layer, head) pattern search")
    search.add_argument("--model", type=Path, required=True, help="local HF model directory")
    search.add_argument("--out", type=Path, default=None,
                        help="config JSON (default: patterns/minference/configs/<model>.json)")
    search.add_argument("--tokens", type=int, default=4096, help="length of each search text")
    search.add_argument("--min-recall", type=float, default=0.9,
                        help="a head whose best candidate keeps less attention mass stays dense")
    search.add_argument("--block-size", type=int, default=64)
    search.add_argument("--seed", type=int, default=0)
    search.add_argument("--threads", type=int, default=2, help="torch threads (<= 2 here)")
    search.set_defaults(func=_cmd_search)
