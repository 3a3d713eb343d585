"""Test-time scaling for small models over any OpenAI-compatible endpoint (arXiv 2509.23324 §5)."""
