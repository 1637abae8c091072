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


# ``train cascade``: what each training option is when the command line does not give it, without a
# preset and with each ``--preset`` (docs/training.md, "Presets"; the base stage's time to quality is
# measured in docs/evaluation.md). ``max_minutes`` may differ per stage: the base stage decides what
# the depth looks like, the super-resolution stages only add detail to it.
# lr 1e-3, not 2e-4: on the CHO stack the base stage showed its depths after 10 minutes of CPU training
# at 1e-3 and only after 30 at 2e-4 (docs/evaluation.md, "Time to quality")
CASCADE_DEFAULTS = {"size": "small", "lr": 1e-3, "batch_size": 16, "steps": 20000, "warmup": 200, "max_minutes": None}
CASCADE_PRESETS = {
    # a CPU: the base stage for an hour of training, each super-resolution stage for 20 minutes
    "quick": {"size": "small", "lr": 1e-3, "batch_size": 16, "steps": 20000, "warmup": 200,
              "max_minutes": {"base": 60, "sr128": 20, "sr256": 20, "sr512": 20}},
    # a GPU: the large network, to the end of its steps
    "full": {"size": "base", "lr": 2e-4, "batch_size": 64, "steps": 40000, "warmup": 500, "max_minutes": None},
}


def cascade_training_options(preset: str | None, stage: str, given: dict) -> dict:
    """The training options of one cascade stage: those ``given`` (not None), else the preset's, else
    :data:`CASCADE_DEFAULTS`."""
    if preset is not None and preset not in CASCADE_PRESETS:
        raise ValueError(f"unknown preset '{preset}': choose one of {', '.join(CASCADE_PRESETS)}.")
    base = CASCADE_PRESETS[preset] if preset else CASCADE_DEFAULTS
    out = {}
    for key, default in CASCADE_DEFAULTS.items():
        v = given.get(key)
        if v is None:
            v = base.get(key, default)
            if isinstance(v, dict):
                v = v.get(stage)
        out[key] = v
    return out
