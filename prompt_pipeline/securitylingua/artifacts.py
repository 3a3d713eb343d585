"""Where the trained artifacts shipped with the repository live."""

from pathlib import Path

ARTIFACTS_DIR = Path(__file__).parent / "artifacts"
DEFAULT_EXTRACTOR_DIR = ARTIFACTS_DIR / "intention-compact"
DEFAULT_HARM_CLASSIFIER = ARTIFACTS_DIR / "harm-classifier.json"
# Fitted on MiniLM's token embeddings alone (no layers): ~0.6 ms instead of ~50 ms on a
# 1K-token prompt's intention. Not the default: see benchmarks/securitylingua_NOTES.md.
SMALL_HARM_CLASSIFIER = ARTIFACTS_DIR / "harm-classifier-l0.json"
# The same embedding, also fitted on the intentions of the training prompts.
SMALL_INTENTIONS_HARM_CLASSIFIER = ARTIFACTS_DIR / "harm-classifier-l0-intentions.json"
