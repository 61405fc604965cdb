"""Loading the profile table: its schema, then its limits against the speed of the engines it sizes."""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from .predict import check_table
from .table import DEFAULT_TABLE, TABLE_ENV, ProfileTable, ProfileTableError, default_catalog, parse_table


def load_table(path: str | os.PathLike | None = None) -> ProfileTable:
    """A table whose TTFT threshold or timeouts its own engines break at the concurrency and context it sizes
    them for (cxygpt_profiles.predict) is refused: the gateway would degrade or time out at that load."""
    path = Path(path or os.environ.get(TABLE_ENV) or DEFAULT_TABLE)
    table = parse_table(path)
    problems = check_table(table, default_catalog())
    if problems:
        raise ProfileTableError(f"{path}: limits below the engines' own speed: " + "; ".join(problems))
    return table


@lru_cache(maxsize=1)
def default_table() -> ProfileTable:
    return load_table()
