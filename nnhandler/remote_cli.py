"""``nnhandler list`` / ``verify`` on URLs (``s3://bucket/run``): the rows and results of
:mod:`nnhandler.cli`, for objects in a store (the store's standard configuration applies:
``AWS_ENDPOINT_URL``, credentials from the environment), sharded ``….dcp`` prefixes
included. ``inspect`` needs nothing extra:
:func:`~nnhandler.checkpoint.sharded.read_any_checkpoint` reads URLs.

Imported by the CLI only for a URL argument.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .checkpoint.discovery import first_valid, read_index_or_warn
from .checkpoint.remote_checkpoints import check_remote_candidate, list_remote_checkpoints
from .checkpoint.remote_sharded import complete_copy
from .checkpoint.storage import URL, store_for
from .errors import CheckpointCorruptedError, CheckpointError

__all__ = ["list_url", "verify_url"]


def list_url(directory: str, *, verify: bool, keys: tuple[str, ...],
             logger: logging.Logger) -> list[dict[str, Any]]:
    """The rows of ``nnhandler list`` (see :func:`nnhandler.cli.list_directory`) for the
    objects directly under ``directory``, with what its retention index says of each."""
    url = URL(directory)
    store = store_for(url)
    index = read_index_or_warn(url, logger, store) or {}
    candidates = list_remote_checkpoints(store, url, index)
    rows: list[dict[str, Any]] = []
    for candidate in candidates:
        record, problem = candidate.record, candidate.problem
        if record is not None and verify:
            try:
                record = check_remote_candidate(store, candidate.path)
            except FileNotFoundError:
                continue  # removed while we read it
            except (CheckpointError, OSError) as error:
                problem = str(error)
        logs: dict[str, Any] = (record.get("logs") if record is not None else None) or {}
        size: int | None = None
        listed = candidate.record
        if listed is not None and "size" in listed:  # a sharded checkpoint's manifest
            size = int(listed["size"])
        elif record is not None:  # the record says how large the object is
            size = int(record["covered_size"]) + 2
        rows.append({
            "name": candidate.path.name, "path": str(candidate.path),
            "epoch": None if record is None else record.get("epoch"),
            "step": None if record is None else record.get("step"),
            "batch": logs.get("batch") if type(logs.get("batch")) is int else None,
            "time": None if record is None else record.get("time"),
            "metrics": {key: logs[key] for key in keys if key in logs},
            "size": size, "valid": record is not None and problem is None,
            "verified": verify and record is not None, "problem": problem, "latest": False,
            "in_index": candidate.indexed, "superseded": candidate.superseded,
            "kept_by": [{"callback": key, "reasons": list(entry.reasons)}
                        for key, section in sorted(index.items())
                        for entry in section.checkpoints if entry.name == candidate.path.name],
        })
    if verify:
        chosen = next((row["path"] for row in rows if row["valid"]), None)
    else:
        pick = first_valid(candidates, check=lambda path: check_remote_candidate(store, path))
        chosen = None if pick is None else str(pick.path)
    for row in rows:
        row["latest"] = row["path"] == chosen
    logger.debug("listed %d checkpoint(s) at %s", len(rows), directory)
    return rows


def verify_url(path: str, verify_local: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    """``nnhandler verify``'s result for the object ``path``: ``verify_local`` (the CLI's
    check of a local file) run on a complete copy, reported under the URL."""
    url = URL(path)
    store = store_for(url)
    try:
        # a sharded checkpoint (a prefix): its files, each checked against the manifest
        with complete_copy(store, url) as local:
            result = verify_local(str(local))
            text = str(local)
    except FileNotFoundError:
        return {"path": path, "ok": False, "kind": "missing", "error": "no such object"}
    except CheckpointCorruptedError as error:
        return {"path": path, "ok": False, "kind": "corrupt", "error": str(error)}
    except (CheckpointError, OSError) as error:
        return {"path": path, "ok": False, "kind": "invalid", "error": str(error)}
    return {key: value.replace(text, path) if isinstance(value, str) else value
            for key, value in result.items()}
