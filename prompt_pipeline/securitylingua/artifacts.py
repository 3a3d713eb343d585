"""Where the trained artifacts shipped with the repository live."""

from pathlib import Path

ARTIFACTS_DIR = Path(__file__).parent / "artifacts"
DEFAULT_EXTRACTOR_DIR = ARTIFACTS_DIR / "intention-compact"
DEFAULT_HARM_CLASSIFIER = ARTIFACTS_DIR / "harm-classifier.json"
