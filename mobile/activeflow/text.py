"""Tokenizer and greedy generation around the engine (HF `tokenizers`, nothing of ours)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from mobile.activeflow.engine import ActiveFlowEngine


def load_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))


def chat_prompt(user: str) -> str:
    """SmolLM2-Instruct's ChatML template for one user turn."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def generate(engine: ActiveFlowEngine, tok, prompt: str, max_tokens: int, chat: bool = True,
             progress: bool = False) -> tuple[list[int], dict]:
    """Greedy decode; returns (generated ids, engine summary with prefill/decode tok/s)."""
    ids = tok.encode(chat_prompt(prompt) if chat else prompt).ids
    stop = {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    engine.reset()
    t0 = time.perf_counter()
    for i, t in enumerate(ids):
        logits = engine.forward_token(t)
        if progress:
            print(f"\r[prefill {i + 1}/{len(ids)}]", end="", file=sys.stderr, flush=True)
    prefill_s = time.perf_counter() - t0
    if progress:
        print(file=sys.stderr)
    out: list[int] = []
    t1 = time.perf_counter()
    for _ in range(max_tokens):
        nxt = int(np.argmax(logits))
        if nxt in stop:
            break
        out.append(nxt)
        if progress:
            print(tok.decode([nxt]), end="", flush=True)
        logits = engine.forward_token(nxt)
    decode_s = time.perf_counter() - t1
    summary = {**engine.summary(), "prompt_tokens": len(ids), "generated_tokens": len(out),
               "prefill_tok_s": len(ids) / prefill_s,
               "decode_tok_s": len(out) / max(decode_s, 1e-9)}
    if progress:
        print(f"\n[mobile] prefill {summary['prefill_tok_s']:.1f} tok/s, decode "
              f"{summary['decode_tok_s']:.1f} tok/s, hit rate {summary['hit_rate']:.0%}, "
              f"{summary['bytes_read_per_token'] / 2**20:.1f} MiB read/token, "
              f"stall {summary['stall_s']:.2f} s", flush=True)
    return out, summary
