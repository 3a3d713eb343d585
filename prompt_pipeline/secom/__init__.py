"""SeCom (arXiv 2502.05589): conversation memory as topical segments (see README.md)."""
