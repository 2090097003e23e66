"""Training checkpoints that survive being killed at any instant.

A training run's output directory holds:

    model/        the EMA weights as a model directory (runtime/model_dir.py)
    state.pt      everything needed to continue the run (weights, EMA, optimiser, LR
                  schedule, AMP scaler, step, data position, arguments)
    log.jsonl     one JSON object per logged step, validation and checkpoint

state.pt is written to a temporary file, flushed to disk and renamed. model/ is replaced
whole by `model_dir.replace` (a hidden sibling swapped in with two renames; a run killed
between them leaves the previous model/ under a hidden name that `model_dir.recover` puts back).
state.pt is written after model/, so whenever a state exists a model at least as new
does too. Training state holds only tensors and plain values, so it loads with
`torch.load(weights_only=True)`: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_path

STATE_FILE = "state.pt"
MODEL_DIR = "model"
LOG_FILE = "log.jsonl"
STATE_FORMAT = "sr3_engine.train_state"
STATE_VERSION = 1
STATE_KEYS = ("step", "data_position", "args", "model_config", "model", "ema", "optimizer", "scheduler",
              "scaler")


class CheckpointError(ValueError):
    """A training state cannot be used; the message names the file and says why."""


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Write a training state atomically (temporary file, fsync, rename)."""
    document = {"format": STATE_FORMAT, "version": STATE_VERSION, **state}
    with atomic_path(path) as tmp:
        torch.save(document, tmp)
        _fsync(tmp)


def load_state(path: Path) -> dict[str, Any]:
    """A training state written by save_state, loaded without unpickling arbitrary objects."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable training state ({first_line})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not an sr3_engine training state")
    if state.get("version", 0) > STATE_VERSION:
        raise CheckpointError(f"{path}: written by a newer sr3_engine (version {state['version']})")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path}: missing entries {missing}")
    return state


def truncate_log(path: Path, step: int) -> None:
    """Drop log records after `step` (and a line cut short by a kill), so a resumed run's
    log reads as if it had never stopped."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{line}\n" for line in kept))


class JsonlLog:
    """Appends one JSON object per line and flushes it, so a kill loses at most one line."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
