"""napari dock widgets: thin magicgui containers over the GUI-free core, with thread workers.

Import the widget classes from their modules (``widgets.generate``); this package imports
nothing heavy by itself, so the core stays importable without Qt or napari.
"""
