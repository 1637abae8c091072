"""The names a user picks from (devices, samplers), without importing torch or diffusers.

The ``zfdiffusion`` parser is built from these, so that ``--help``, ``--version`` and ``models``
start in a fraction of a second. :mod:`.device` and :mod:`.diffusion.sampling` hold the same
tuples (tests/test_cli_start.py checks that they agree).
"""

DEVICES = ("auto", "cpu", "cuda", "mps")
SAMPLERS = ("dpmsolver++", "ddim", "ddpm")
DEFAULT_SAMPLER = "dpmsolver++"

__all__ = ["DEFAULT_SAMPLER", "DEVICES", "SAMPLERS"]
