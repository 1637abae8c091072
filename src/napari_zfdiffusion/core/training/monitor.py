"""Following a training run from outside its process (the napari Train dock, a script): the new lines of
its log (``OUT/training/STAGE/log.jsonl``, written by :mod:`.loop`) and of its console output, where its
training state and model files are, and whether a run holds the folder now.

GUI-free and torch-free: plain files only. A reader remembers how far it has read, keeps a half-written
last line for the next call, and starts again from the top when the file was replaced or cut (a resumed
run trims the log back to its checkpoint; a fresh run deletes it).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..io import LOCK_NAME
from ..store import CARD_FILE, CASCADE_FILE, STAGE_FILE

STATE_FILE = "state.pt"
LOG_FILE = "log.jsonl"
CONSOLE_FILE = "console.log"  # what the Train dock sends the command's output to (beside the log)
# the folder of training/ each command trains into (the cascade: its stage's name)
STATE_FOLDERS = {"unet": "unet", "vae": "vae", "ldm": "unet"}
# the kind of model.json each command writes ("cascade": cascade.json)
MODEL_KINDS = {"unet": "segmentation", "vae": "vae", "ldm": "latent", "cascade": "cascade"}


def state_dir(out: str | Path, command: str, stage: str = "base") -> Path:
    """``OUT/training/STAGE``: where ``zfdiffusion train COMMAND`` keeps its state, its log and (from the
    Train dock) its console output."""
    return Path(out) / "training" / (stage if command == "cascade" else STATE_FOLDERS[command])


def has_state(out: str | Path, command: str, stage: str = "base") -> bool:
    """Whether ``out`` holds a training state of this command (and stage) to resume."""
    return (state_dir(out, command, stage) / STATE_FILE).is_file()


def model_marker(out: str | Path, command: str, stage: str = "base") -> Path:
    """The file a checkpoint's export writes last: ``model.json``, or the stage's ``stage.json`` for the
    cascade (its weights are in place once it has changed)."""
    out = Path(out)
    return out / stage / STAGE_FILE if command == "cascade" else out / CARD_FILE


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, size, modification time in ns) of ``path``, None if it is not there: a new checkpoint's
    export changes it (files are renamed into place, so the inode changes even within one tick)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def folder_kind(out: str | Path) -> str | None:
    """The kind of model ``out`` holds ("cascade", "segmentation", "vae", "latent", ...), None if none
    (or a card that cannot be read, which is also not a model to train into)."""
    out = Path(out)
    for name in (CASCADE_FILE, CARD_FILE):
        try:
            card = json.loads((out / name).read_text())
        except FileNotFoundError:
            continue
        except (OSError, ValueError):
            return "unreadable"
        return str(card.get("kind", "cascade" if name == CASCADE_FILE else "unknown")) if isinstance(card, dict) \
            else "unreadable"
    return None


def holder(folder: str | Path) -> str | None:
    """Who holds the training lock of ``folder`` (a run writing there now): a description, or None if
    nobody does (a lock left by a killed run is free: it is an OS file lock)."""
    from filelock import FileLock, Timeout

    folder = Path(folder)
    path = folder / LOCK_NAME
    if not path.exists():
        return None
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            held = json.loads(path.with_name(path.name + ".json").read_text())
            return f"process {held.get('pid')} on {held.get('host')}, since {held.get('since')}"
        except (OSError, ValueError):
            return "another process"
    except OSError:
        return None
    lock.release()
    return None


class TailReader:
    """The new bytes of a growing file, as complete lines: :meth:`read` returns the lines ended since the
    last call; a line still being written waits for its end. ``reset`` is True after a call that found
    the file replaced or shorter than what was read (read again from the top). ``offset``: where to start
    (e.g. the end of what an earlier run wrote to a file that is appended to)."""

    def __init__(self, path: str | Path, offset: int = 0):
        self.path = Path(path)
        self.offset = offset
        self.inode: int | None = None
        if offset:
            try:
                self.inode = os.stat(self.path).st_ino
            except OSError:
                self.offset = 0
        self.partial = b""
        self.reset = False

    def _chunk(self, limit: int | None = None) -> bytes:
        self.reset = False
        try:
            st = os.stat(self.path)
        except OSError:
            if self.offset or self.partial:  # deleted (a fresh run): start again when it comes back
                self.offset, self.inode, self.partial, self.reset = 0, None, b"", True
            return b""
        if (self.inode is not None and st.st_ino != self.inode) or st.st_size < self.offset:
            self.offset, self.partial, self.reset = 0, b"", True
        self.inode = st.st_ino
        if st.st_size == self.offset:
            return b""
        try:
            with open(self.path, "rb") as f:
                if limit is not None and st.st_size - self.offset > limit:
                    self.offset = st.st_size - limit  # far behind (a long run's output): its tail only
                    self.partial = b""
                f.seek(self.offset)
                data = f.read(st.st_size - self.offset)
        except OSError:
            return b""
        self.offset += len(data)
        return data

    def read(self) -> list[str]:
        data = self.partial + self._chunk()
        *lines, self.partial = data.split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]


@dataclass
class TrainingLog:
    """What a run's ``log.jsonl`` says so far: steps with their loss (mean since the last line) and
    smoothed loss, and the validation figures of each checkpoint."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    loss_smooth: list[float] = field(default_factory=list)
    validation: list[tuple[int, dict]] = field(default_factory=list)
    seconds: float | None = None

    def add(self, record: dict) -> None:
        if not isinstance(record, dict) or "step" not in record:
            return
        step = int(record["step"])
        if "validation" in record:
            if isinstance(record["validation"], dict):
                self.validation.append((step, record["validation"]))
            return
        if "loss" in record:
            self.steps.append(step)
            self.loss.append(_number(record.get("loss")))
            self.loss_smooth.append(_number(record.get("loss_smooth", record.get("loss"))))
            if isinstance(record.get("seconds"), (int, float)):
                self.seconds = float(record["seconds"])

    @property
    def last_step(self) -> int:
        """The last step logged (a loss line or a checkpoint's validation), 0 if none."""
        return max(self.steps[-1] if self.steps else 0, self.validation[-1][0] if self.validation else 0)

    @property
    def last_validation(self) -> dict | None:
        return self.validation[-1][1] if self.validation else None


class LogFollower:
    """Follows ``log.jsonl``: :meth:`poll` reads its new lines into :attr:`log` and says whether anything
    changed; when the file was replaced or cut (a resumed run trims it to its checkpoint), the log is
    read again from the top. A line that is not JSON (cut by a kill) is skipped."""

    def __init__(self, path: str | Path):
        self.reader = TailReader(path)
        self.log = TrainingLog()

    @property
    def path(self) -> Path:
        return self.reader.path

    def poll(self) -> bool:
        lines = self.reader.read()
        changed = self.reader.reset
        if self.reader.reset:
            self.log = TrainingLog()
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            self.log.add(record)
            changed = True
        return changed


class ConsoleFollower:
    """Follows a command's console output (stdout and stderr in one file): :meth:`poll` gives the lines
    ended since the last call as a terminal shows them (a progress bar's carriage-return updates keep
    only their last state), and :attr:`current` the line being written (the progress bar now). ``offset``:
    where to start (the end of an earlier run's output, for a resumed run that appends to it)."""

    def __init__(self, path: str | Path, tail_bytes: int = 256 * 1024, offset: int = 0):
        self.reader = TailReader(path, offset)
        self.tail_bytes = tail_bytes
        self.current = ""

    def poll(self) -> list[str]:
        data = self.reader.partial + self.reader._chunk(self.tail_bytes)
        *lines, rest = data.split(b"\n")
        self.reader.partial = rest
        self.current = _shown(rest.decode("utf-8", "replace"))
        return [_shown(line.decode("utf-8", "replace")) for line in lines]


def _shown(line: str) -> str:
    """What a terminal shows of a line with carriage returns: its last non-empty part."""
    parts = [p for p in line.rstrip("\r").split("\r") if p.strip()]
    return parts[-1] if parts else ""


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def describe_validation(figures: dict | None) -> str:
    """Validation figures in a line: "iou 0.812, dice 0.896, f1 0.74" (numbers only, 3 digits)."""
    if not figures:
        return ""
    return ", ".join(f"{k} {v:.3g}" for k, v in figures.items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool))


__all__ = ["CONSOLE_FILE", "LOG_FILE", "MODEL_KINDS", "STATE_FILE", "ConsoleFollower", "LogFollower", "TailReader",
           "TrainingLog", "describe_validation", "file_signature", "folder_kind", "has_state", "holder",
           "model_marker", "state_dir"]
