"""RetroInfer (arXiv 2505.02922): the KV cache as a vector store. See README.md."""
