"""Calibrated profiles keyed by (model, GPU type, executor), in SQLite (a path setting; ':memory:' for none)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from services.rpc import profiler_pb2


class ProfileStore:
    def __init__(self, path: str | Path) -> None:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path))
        self.db.execute("CREATE TABLE IF NOT EXISTS profiles (model TEXT, gpu_type TEXT, executor TEXT, "
                        "profile BLOB, updated REAL, PRIMARY KEY (model, gpu_type, executor))")
        self.db.commit()

    @staticmethod
    def _key(model: str, gpu_type: str, executor: str) -> tuple[str, str, str]:
        return model, gpu_type.lower(), executor or "sim"

    def put(self, profile: profiler_pb2.LatencyProfile) -> None:
        self.db.execute("INSERT OR REPLACE INTO profiles VALUES (?, ?, ?, ?, ?)",
                        (*self._key(profile.model, profile.gpu_type, profile.executor),
                         profile.SerializeToString(), time.time()))
        self.db.commit()

    def get(self, model: str, gpu_type: str, executor: str) -> profiler_pb2.LatencyProfile | None:
        row = self.db.execute("SELECT profile FROM profiles WHERE model = ? AND gpu_type = ? AND executor = ?",
                              self._key(model, gpu_type, executor)).fetchone()
        return profiler_pb2.LatencyProfile.FromString(row[0]) if row else None

    def all(self) -> list[profiler_pb2.LatencyProfile]:
        return [profiler_pb2.LatencyProfile.FromString(r[0]) for r in self.db.execute("SELECT profile FROM profiles")]

    def close(self) -> None:
        self.db.close()
