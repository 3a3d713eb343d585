"""LLMLingua-2-style keep/drop token classifier, shared by SecurityLingua and SeCom."""

from prompt_pipeline.token_classifier.classifier import Compression, TokenClassifier

__all__ = ["Compression", "TokenClassifier"]
