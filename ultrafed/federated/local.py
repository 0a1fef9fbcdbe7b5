"""A round with no tracking server: weights in memory, the record as JSON lines.

For machines that have torch but no MLflow (the lent GPU machine of ``bench/gpu_protocol.py``)
and for fast tests: :func:`ultrafed.federated.round.run_round` runs unchanged, so a result from
there and one from a production round come from the same code.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from torch import Tensor

from ultrafed.federated.round import RoundContext
from ultrafed.tracking.lineage import Lineage


class MemoryStateStore:
    """States kept in this process under ``mem://<sha256>``, checked on every read."""

    def __init__(self) -> None:
        self._states: dict[str, dict[str, Tensor]] = {}
        self._lock = threading.Lock()

    def put(self, state: Mapping[str, Tensor], run_id: str | None, name: str, *,
            meta: Mapping[str, Any] | None = None) -> str:
        from ultrafed.federated.transfer import state_sha256

        sd = {k: v.detach().cpu() for k, v in state.items()}
        sha = state_sha256(sd)
        with self._lock:
            self._states[sha] = sd
        return f"mem://{sha}"

    def get(self, uri: str, sha256: str | None) -> dict[str, Tensor]:
        key = uri.removeprefix("mem://")
        if sha256 and key != sha256:
            raise KeyError(f"{uri}: sha256 mismatch (expected {sha256[:12]}, got {key[:12]})")
        with self._lock:
            if key not in self._states:
                raise KeyError(f"{uri}: no such state in this process")
            return dict(self._states[key])

    def retain(self, shas: Collection[str]) -> None:
        """Forget every state but ``shas`` (the loop keeps one round's worth)."""
        with self._lock:
            self._states = {k: v for k, v in self._states.items() if k in shas}

    def __len__(self) -> int:
        return len(self._states)


class JsonlRoundTracker:
    """Writes one ``{"kind": "round", ...}`` JSON line per completed round (metrics and lineage);
    registers nothing (``version`` None): the caller keeps the final weights itself."""

    def __init__(self, path: str | Path | None, run_name: str, *, store: MemoryStateStore | None = None) -> None:
        self.path, self.run_name = (Path(path) if path else None), run_name
        self.store = store if store is not None else MemoryStateStore()
        self.rounds: list[dict[str, Any]] = []
        self._pending: dict[int, dict[str, Any]] = {}

    def start_round(self, round_idx: int, sites: Sequence[str], run_key: str) -> RoundContext:
        return RoundContext(round_idx=round_idx, run_id=None, site_run_ids={s: None for s in sites}, run_key=run_key)

    def log_round(self, ctx: RoundContext, metrics: Mapping[str, float]) -> None:
        self._pending[ctx.round_idx] = {"kind": "round", "run": self.run_name, "round": ctx.round_idx,
                                        "metrics": dict(metrics)}

    def register(self, ctx: RoundContext, state: dict[str, Tensor], lineage: Lineage,
                 metrics: Mapping[str, float]) -> tuple[int | None, str | None]:
        self._pending.setdefault(ctx.round_idx, {"kind": "round", "run": self.run_name, "round": ctx.round_idx})
        self._pending[ctx.round_idx]["lineage"] = lineage.to_dict()
        return None, None

    def end_round(self, ctx: RoundContext, failed_sites: Collection[str], ok: bool) -> None:
        line = self._pending.pop(ctx.round_idx, {"kind": "round", "run": self.run_name, "round": ctx.round_idx})
        line["status"] = "ok" if ok else "failed"
        line["failed_sites"] = sorted(failed_sites)
        self.rounds.append(line)
        if self.path is None:
            return
        data = (json.dumps(line, allow_nan=True, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)  # one write: lines never interleave
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
