"""Tile quantization and LUT kernels from "LLM test-time scaling on mobile NPUs" (arXiv 2509.23324).

See README.md for the map from files to the paper's sections.
"""
