"""LeanK (arXiv 2508.02215): learned static K-channel masks. See README.md in this folder."""

from kv_manager.leank.mask import LeanKMask, MaskMismatchError, load_mask, save_mask

__all__ = ["LeanKMask", "MaskMismatchError", "load_mask", "save_mask"]
