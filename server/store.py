"""RoundStore: the run folder on disk. Files are written whole or not at all."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name, fsync, rename, fsync the folder: a crash leaves old or new."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_state(path: Path, state: dict[str, torch.Tensor], meta: dict[str, str] | None = None):
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, st_save(tensors, metadata=meta))


class RoundStore:
    """Layout of ``runs/<run-id>/``:

    config.yaml            the effective config
    metrics.jsonl          one JSON object per round (round 0: the initial model)
    checkpoints/round-NNNN.safetensors   global model after each round
    final_model.safetensors + model.json  the last global model and its architecture
    uploads/round-NNNN/<silo>.safetensors  decoded uploads, when save_uploads is on
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)

    def save_config(self, text: str) -> None:
        atomic_write(self.run_dir / "config.yaml", text.encode())

    def save_checkpoint(self, round_num: int, state: dict[str, torch.Tensor]) -> Path:
        path = self.run_dir / "checkpoints" / f"round-{round_num:04d}.safetensors"
        save_state(path, state, {"round": str(round_num)})
        return path

    def save_upload(self, round_num: int, silo_id: str, state: dict[str, torch.Tensor]) -> None:
        folder = self.run_dir / "uploads" / f"round-{round_num:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_state(folder / f"{silo_id}.safetensors", state)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, sort_keys=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def save_final(self, state: dict[str, torch.Tensor], model_spec: dict[str, Any]) -> None:
        save_state(self.run_dir / "final_model.safetensors", state)
        atomic_write(self.run_dir / "model.json", json.dumps(model_spec, indent=2).encode())
