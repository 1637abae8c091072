"""The plugin's version: one place, read by the build (hatch) and by :mod:`.core.provenance`."""

__version__ = "0.1.0"
