"""Choice of device and precision (auto = cuda > mps > cpu), the optional ``torch.compile`` of the
inference networks, and batch sizes from a GPU's free memory."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch

from .choices import check_device
from .errors import UserInputError

DEVICES = ("auto", "cpu", "cuda", "mps")

# ZFDIFFUSION_COMPILE=1: the inference networks loaded on a CUDA GPU run through torch.compile.
COMPILE_ENV = "ZFDIFFUSION_COMPILE"


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """Turn a user's device choice into a ``torch.device``, or say clearly why it cannot be had.

    Takes auto, cpu, cuda, cuda:N (the GPU numbered N, 0 = the first) and mps."""
    if isinstance(name, torch.device):
        return name
    try:
        name = check_device(name or "auto")
    except ValueError as e:
        raise UserInputError(str(e)) from None
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
        if ":" in name:
            index, count = int(name.split(":")[1]), torch.cuda.device_count()
            if index >= count:
                have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
                raise UserInputError(
                    f"device '{name}' was asked for, but this machine has {count} CUDA GPU"
                    f"{'' if count == 1 else 's'} ({have}; CUDA_VISIBLE_DEVICES may hide others). "
                    "Use one of those, or cuda for the first."
                )
        return torch.device(name)
    if name == "mps":
        if not _mps_available():
            raise UserInputError("device 'mps' was asked for, but Apple's MPS is not available here. Use cpu or auto.")
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision to sample in on this device (None: stay in float32)."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def available_devices() -> list[str]:
    """The device choices that can work here (with cuda:0, cuda:1, ... when there are several GPUs)."""
    out = ["auto", "cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
        count = torch.cuda.device_count()
        if count > 1:
            out.extend(f"cuda:{i}" for i in range(count))
    if _mps_available():
        out.append("mps")
    return out


# ----------------------------------------------------------------------------- torch.compile
def compile_wanted() -> bool:
    """Whether ZFDIFFUSION_COMPILE asks for ``torch.compile`` (1, true, yes or on)."""
    return os.environ.get(COMPILE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def maybe_compile(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """``module`` with its forward run through ``torch.compile`` when ZFDIFFUSION_COMPILE=1 and
    ``device`` is a CUDA GPU; otherwise (CPU, MPS, or the variable unset) ``module`` untouched.

    The module is changed in place and returned: its forward becomes the compiled one, so its class,
    attributes (``config``, ...) and ``state_dict`` keys stay as they were. Compiling happens at the
    first call (and again for new input shapes); if it fails there, the module runs eagerly from
    then on, after a one-line warning. A GPU out of memory is raised as it is, not taken for a
    compile failure.
    """
    if not compile_wanted() or torch.device(device).type != "cuda" or "_zf_eager_forward" in module.__dict__:
        return module
    eager = module.forward
    try:
        compiled = torch.compile(eager)
    except Exception as e:  # noqa: BLE001 - e.g. no compiler backend for this Python
        _compile_failed(module, e)
        return module
    use = [compiled]

    def forward(*args, **kwargs):
        if use[0] is not eager:
            try:
                return use[0](*args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - Dynamo, Inductor or Triton failed: run eagerly
                use[0] = eager
                _compile_failed(module, e)
        return eager(*args, **kwargs)

    module._zf_eager_forward = eager
    module.forward = forward
    return module


def _compile_failed(module: torch.nn.Module, error: BaseException) -> None:
    first = (str(error).strip().splitlines() or [""])[0][:200]
    warnings.warn(f"torch.compile failed for {type(module).__name__} ({type(error).__name__}: {first}); "
                  f"running it without compiling ({COMPILE_ENV}=0 turns compiling off)", RuntimeWarning, stacklevel=3)


# ----------------------------------------------------------------------------- batch sizes
def auto_batch(device: str | torch.device, bytes_per_item: int, default: int, cap: int, *,
               fraction: float = 0.5, reserve: int = 1 << 30) -> int:
    """Items per forward pass on ``device``.

    On a CUDA GPU: as many items of ``bytes_per_item`` as fit in ``fraction`` of its free memory
    (``torch.cuda.mem_get_info``, so other programs' use counts) less ``reserve`` bytes (kernels'
    workspaces, the allocator's rounding), at least 1 and at most ``cap``. Elsewhere (CPU, MPS),
    or if the GPU cannot say how much is free: ``default``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return default
    try:
        free, _total = torch.cuda.mem_get_info(device)
    except (RuntimeError, AssertionError, ValueError):  # no CUDA after all, or a driver that does not say
        return default
    fit = int((free * fraction - reserve) // max(1, int(bytes_per_item)))
    return max(1, min(int(cap), fit))


def pyramid_bytes(channels: Sequence[int], side: int, *, factor: float = 8.0, bytes_per_value: int = 4) -> int:
    """A conservative estimate of the memory one item takes in an inference pass through a U-Net-like
    network whose level ``l`` holds ``channels[l]`` feature maps of ``ceil(side / 2**l)`` squared pixels.

    The sum over the levels of channels x pixels is the size of one set of feature maps; ``factor``
    (8) of them may be alive at once: the skip connection kept for the decoder, a residual block's
    input, two convolution outputs and the normalised and activated copies, the decoder's upsampled
    and concatenated maps. ``bytes_per_value`` 4 (float32), although the networks run in bf16 or fp16
    under autocast on a GPU: about twice what is needed, on purpose.
    """
    values = sum(int(c) * (-(-int(side) // 2 ** lvl)) ** 2 for lvl, c in enumerate(channels))
    return int(factor * bytes_per_value * values)
