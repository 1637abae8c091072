"""The names a user picks from (devices, samplers), without importing torch or diffusers.

The ``zfdiffusion`` parser is built from these, so that ``--help``, ``--version`` and ``models``
start in a fraction of a second. :mod:`.device` and :mod:`.diffusion.sampling` hold the same
tuples (tests/test_cli_start.py checks that they agree).
"""

import re

DEVICES = ("auto", "cpu", "cuda", "mps")
# What --device takes: the names above, and cuda:N for the GPU numbered N (0 = the first).
DEVICE_FORMS = ("auto", "cpu", "cuda", "cuda:N", "mps")
SAMPLERS = ("dpmsolver++", "ddim", "ddpm")
DEFAULT_SAMPLER = "dpmsolver++"


def check_device(name: str) -> str:
    """``name`` as a device choice (lower case; ``cuda:N`` with N written plainly), or a ValueError
    that names the forms a device may take. Says nothing about whether this machine has it: that is
    :func:`.device.resolve_device`'s job."""
    text = str(name).strip().lower()
    if text in DEVICES:
        return text
    m = re.fullmatch(r"cuda:(\d+)", text)
    if m:
        return f"cuda:{int(m.group(1))}"
    raise ValueError(f"unknown device '{name}': choose one of {', '.join(DEVICE_FORMS)} "
                     "(N: the GPU's number, 0 for the first).")


__all__ = ["DEFAULT_SAMPLER", "DEVICES", "DEVICE_FORMS", "SAMPLERS", "check_device"]
