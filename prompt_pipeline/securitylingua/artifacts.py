"""Where the trained artifacts shipped with the repository live."""

from pathlib import Path

ARTIFACTS_DIR = Path(__file__).parent / "artifacts"
DEFAULT_EXTRACTOR_DIR = ARTIFACTS_DIR / "intention-compact"
# Block mode's default: attention-pooled head on MiniLM's token embeddings (no layers),
# fitted also on the training prompts' intentions (`harm_attention.py`): ~0.7 ms on a
# 1K-token prompt's intention. Chosen by the rule in benchmarks/securitylingua_NOTES.md.
ATTENTION_HARM_CLASSIFIER = ARTIFACTS_DIR / "harm-classifier-attention.json"
# The previous default: logistic regression on the full MiniLM sentence embedding (~50 ms).
FULL_HARM_CLASSIFIER = ARTIFACTS_DIR / "harm-classifier.json"
DEFAULT_HARM_CLASSIFIER = ATTENTION_HARM_CLASSIFIER
# Fitted on the mean of MiniLM's token embeddings alone (no layers): fast, but misses short
# blunt requests (see the NOTES); kept for the comparison.
SMALL_HARM_CLASSIFIER = ARTIFACTS_DIR / "harm-classifier-l0.json"
# The same embedding, also fitted on the intentions of the training prompts.
SMALL_INTENTIONS_HARM_CLASSIFIER = ARTIFACTS_DIR / "harm-classifier-l0-intentions.json"
