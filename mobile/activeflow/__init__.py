"""ActiveFlow (arXiv 2504.08378): active-weight swapping between flash and a DRAM budget.

See README.md for the map from files to the paper's sections.
"""
