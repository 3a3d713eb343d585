"""MMInference (arXiv 2504.16083): the grid head and the permutations that make it
block-sparse. See README.md."""
