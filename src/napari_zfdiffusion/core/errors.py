"""Errors shown to users, and the cancellation signal shared by every long-running job."""

from __future__ import annotations

import threading


class UserInputError(ValueError):
    """Bad input from a user: the message names the problem and the fix.

    The CLI prints it without a traceback; the widgets show it as a napari notification.
    """


class Cancelled(Exception):
    """Raised inside a progress callback to stop the running job within one step."""


class CancelToken:
    """A thread-safe flag: a GUI thread calls :meth:`cancel`, the worker calls :meth:`check`."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")
