"""Segmentation with a residual U-Net: the network (:mod:`.net`), tiled inference on images and
stacks of any size (:mod:`.segmenter`) and training on real or generated pairs (:mod:`.train`)."""

from .segmenter import SegResult, Segmenter, describe

__all__ = ["SegResult", "Segmenter", "describe"]
