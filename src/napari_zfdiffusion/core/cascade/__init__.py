"""The zebrafish depth cascade: a 64x64 depth-conditioned base model and super-resolution stages to
512, slices and whole volumes (:mod:`.model`); its training data (:mod:`.data`, :mod:`.depths`),
training (:mod:`.train`) and synthetic data sets at scale (:mod:`.dataset`)."""

from .model import Cascade, Result, describe

__all__ = ["Cascade", "Result", "describe"]
