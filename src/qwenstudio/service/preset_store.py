"""Presets (named sets of request fields), a role of ``Store``; names are unique on both backends (``Conflict``
"preset_exists")."""

from __future__ import annotations

import json
import time
from typing import Any

from .database import Result, Rows


class PresetRows(Rows):
    """Preset statements over ``self.db``."""

    def list_presets(self) -> list[dict[str, Any]]:
        return [self._preset_dict(r) for r in self.rows("SELECT * FROM presets ORDER BY name")]

    def get_preset(self, preset_id: str) -> dict[str, Any] | None:
        rows = self.rows("SELECT * FROM presets WHERE id=?", (preset_id,))
        return self._preset_dict(rows[0]) if rows else None

    def find_preset(self, name_or_id: str) -> dict[str, Any] | None:
        """A preset by id, else by name (the most recently updated one of that name)."""
        rows = self.rows("SELECT * FROM presets WHERE id=?", (name_or_id,)) or \
            self.rows("SELECT * FROM presets WHERE name=? ORDER BY updated_at DESC LIMIT 1", (name_or_id,))
        return self._preset_dict(rows[0]) if rows else None

    def insert_preset(self, preset_id: str, name: str, params: dict, description: str = "", author: str = "") -> None:
        """Raises Conflict ("preset_exists") when the name is taken, on either backend."""
        now = time.time()
        self._unique_name(name, lambda: self.run(
            "INSERT INTO presets (id, name, description, author, params, created_at, updated_at) "
            "VALUES (?,?,?,?,?,?,?)",
            (preset_id, name, description, author, json.dumps(params), now, now),
        ))

    def update_preset(self, preset_id: str, name: str, params: dict, description: str = "", author: str = "") -> bool:
        cur = self._unique_name(name, lambda: self.run(
            "UPDATE presets SET name=?, description=?, author=?, params=?, updated_at=? WHERE id=?",
            (name, description, author, json.dumps(params), time.time(), preset_id),
        ))
        return cur.rowcount == 1

    def delete_preset(self, preset_id: str) -> bool:
        return self.run("DELETE FROM presets WHERE id=?", (preset_id,)).rowcount == 1

    def _unique_name(self, name: str, write) -> Result:
        from .errors import Conflict

        try:
            return write()
        except Exception as e:
            if self.db.is_unique_violation(e):
                raise Conflict(f"a preset named '{name}' exists", code="preset_exists") from None
            raise

    @staticmethod
    def _preset_dict(row: dict[str, Any]) -> dict[str, Any]:
        d = dict(row)
        d["params"] = json.loads(d["params"])
        return d
