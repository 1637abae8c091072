"""Choice of device and precision: auto = cuda > mps > cpu."""

from __future__ import annotations

import torch

from .errors import UserInputError

DEVICES = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn a user's device choice into a ``torch.device``, or say clearly why it cannot be had."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserInputError(
                f"device '{name}' was asked for, but this PyTorch sees no CUDA GPU "
                f"(torch {torch.__version__}). Use --device cpu or auto, or install a CUDA build of PyTorch."
            )
        return torch.device(name)
    if name == "mps":
        if not _mps_available():
            raise UserInputError("device 'mps' was asked for, but Apple's MPS is not available here. Use cpu or auto.")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise UserInputError(f"unknown device '{name}': choose one of {', '.join(DEVICES)}.")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision to sample in on this device (None: stay in float32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def available_devices() -> list[str]:
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if _mps_available():
        out.append("mps")
    return out
