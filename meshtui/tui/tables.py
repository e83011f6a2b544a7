"""Keep a DataTable in step with rows of cells while touching as little as possible.

Any cell update re-renders the whole table, and resizing a column lays the whole screen out again, so this
updates only the cells that changed and lets columns grow but never shrink.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import DataTable


class TableSync:
    def __init__(self, table: DataTable[Text], columns: Sequence[tuple[str, str]]) -> None:
        self.table = table
        self.keys = [key for key, _ in columns]
        self._shown: dict[tuple[str, str], tuple[str, object]] = {}
        self._widest = {key: len(label) for key, label in columns}
        for key, label in columns:
            table.add_column(label, key=key)

    def show(self, row_key: str, cells: Sequence[Text]) -> None:
        """Add the row, or update the cells of it that changed."""
        if len(cells) != len(self.keys):
            raise ValueError(f"{len(cells)} cells for {len(self.keys)} columns")
        if row_key not in self.table.rows:
            self.table.add_row(*cells, key=row_key)
            for key, cell in zip(self.keys, cells, strict=True):
                self._shown[(row_key, key)] = (cell.plain, cell.style)
                self._widest[key] = max(self._widest[key], cell.cell_len)
            return
        for key, cell in zip(self.keys, cells, strict=True):
            seen = (cell.plain, cell.style)
            if self._shown.get((row_key, key)) == seen:
                continue
            self._shown[(row_key, key)] = seen
            wider = cell.cell_len > self._widest[key]
            self._widest[key] = max(self._widest[key], cell.cell_len)
            self.table.update_cell(row_key, key, cell, update_width=wider)
