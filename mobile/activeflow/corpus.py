"""Local text for distillation and evaluation, split so that no evaluation text is trained on.

Nothing is downloaded: the box has license texts (`/usr/share/common-licenses`) and package
documentation (`/usr/share/doc/**/*.md[.gz]`). The split, fixed by path so every run and
machine with the same files gets the same one:
  eval "apache"  the Apache-2.0 license (the held-out text of the earlier quality table)
  eval "docs"    doc files whose path hashes to bucket 0 of 8: a second, non-license domain
  train          every other license text (deduplicated) and the other doc files, minus any
                 file quoting the Apache license (so no eval text leaks into training)
Threshold calibration keeps using the first 256 tokens of GPL-3 (train side).
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
DOCS = Path("/usr/share/doc")
APACHE = LICENSES / "Apache-2.0"
CALIBRATION = LICENSES / "GPL-3"
EVAL_BUCKETS = 8
_APACHE_MARKERS = ("Apache License", "apache.org/licenses")


def _read(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def _bucket(path: Path) -> int:
    return int(hashlib.sha1(str(path).encode()).hexdigest(), 16) % EVAL_BUCKETS


def doc_files(root: Path = DOCS, min_bytes: int = 2048) -> list[Path]:
    """Markdown docs (plain or gzipped) of at least `min_bytes`, sorted, symlinks skipped."""
    found = [
        p
        for pattern in ("*.md", "*.md.gz")
        for p in root.rglob(pattern)
        if p.is_file() and not p.is_symlink() and p.stat().st_size >= min_bytes
    ]
    return sorted(found)


def split_texts(licenses: Path = LICENSES, docs: Path = DOCS) -> dict[str, list[str]]:
    """{'train': [...], 'eval_docs': [...]} of document texts; Apache-2.0 is never in either."""
    train, eval_docs, seen = [], [], set()
    for path in sorted(licenses.iterdir()):
        text = _read(path)
        digest = hashlib.sha1(text.encode()).digest()
        if path.name == APACHE.name or digest in seen or not path.is_file():
            continue
        seen.add(digest)  # GPL == GPL-3 etc. are copies
        train.append(text)
    for path in doc_files(docs):
        text = _read(path)
        if any(m in text for m in _APACHE_MARKERS):
            continue
        (eval_docs if _bucket(path) == 0 else train).append(text)
    return {"train": train, "eval_docs": eval_docs}


def tokens_of(tok, texts: list[str], eos_id: int) -> list[int]:
    """All texts tokenized and joined with EOS, so windows may cross document borders."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):  # batched: the Rust tokenizer's own threads
        ids.extend(enc.ids)
        ids.append(eos_id)
    return ids
