"""`infra queue status`: counts per queue, workers, and the node documents their heartbeats publish.

Everything read here was written into Redis by someone: workers, submitters, or anyone else with
access. A queue name, worker record or heartbeat document that does not have the expected shape is
skipped with a note in the result (`notes`), never a crash; strings are shown without control
characters.
"""

from __future__ import annotations

import json

from runner.queue.connection import NODE_KEY_PREFIX, queue, serializer

MAX_NODE_DOC_BYTES = 64 * 1024  # a node document is about 2 KB
# Keys of a node document that status reads, with the JSON types they may have.
NODE_FIELDS = {
    "worker": (str,),
    "state": (str, type(None)),
    "current_job": (str, type(None)),
    "heartbeat_at": (str, type(None)),
    "queues": (list, type(None)),
}


def printable(value, limit: int = 200) -> str:
    """`value` as one line of text without control characters (escape sequences included)."""
    text = value if isinstance(value, str) else str(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def queue_status(conn, names: list[str] | None = None) -> dict:
    """Counts per queue (queued, started, finished, failed, …), workers and node heartbeats.

    Returns {"queues": [...], "workers": [...], "notes": [...]}; a note names each value skipped.
    """
    notes: list[str] = []
    queues = [_queue_counts(conn, name) for name in (names or _queue_names(conn, notes))]
    nodes = _node_docs(conn, notes)
    workers = _workers(conn, nodes, notes)
    workers.extend(_worker_doc(None, node) for node in nodes.values())  # a heartbeat whose RQ record is gone
    return {"queues": queues, "workers": sorted(workers, key=lambda d: d["name"] or ""), "notes": notes}


def _queue_names(conn, notes: list[str]) -> list[str]:
    from rq import Queue

    names = []
    for raw in conn.smembers(Queue.redis_queues_keys):
        key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        if not key.startswith(Queue.redis_queue_namespace_prefix) or len(key) > 300:
            notes.append(f"queue key {printable(key, 80)!r} in {Queue.redis_queues_keys} is not an RQ queue; skipped")
            continue
        names.append(key[len(Queue.redis_queue_namespace_prefix) :])
    return sorted(names)


def _queue_counts(conn, name: str) -> dict:
    from rq.registry import (
        DeferredJobRegistry,
        FailedJobRegistry,
        FinishedJobRegistry,
        ScheduledJobRegistry,
        StartedJobRegistry,
    )

    ser = serializer()
    return {
        "name": name,
        "queued": queue(conn, name).count,
        # zcard, not count(): counting would run the abandoned-job cleanup from a status query
        "started": conn.zcard(StartedJobRegistry(name, connection=conn, serializer=ser).key),
        "finished": FinishedJobRegistry(name, connection=conn, serializer=ser).count,
        "failed": FailedJobRegistry(name, connection=conn, serializer=ser).count,
        "deferred": DeferredJobRegistry(name, connection=conn, serializer=ser).count,
        "scheduled": ScheduledJobRegistry(name, connection=conn, serializer=ser).count,
    }


def _node_docs(conn, notes: list[str]) -> dict[str, dict]:
    """The heartbeat documents by worker name; anything else under the prefix is skipped with a note."""
    import redis

    nodes: dict[str, dict] = {}
    for raw_key in conn.scan_iter(match=f"{NODE_KEY_PREFIX}*", count=500):
        key = printable(raw_key.decode("utf-8", "replace") if isinstance(raw_key, bytes) else raw_key, 120)
        try:
            size = conn.strlen(raw_key)
            raw = conn.get(raw_key) if size <= MAX_NODE_DOC_BYTES else None
            ttl = conn.ttl(raw_key)
        except redis.exceptions.ResponseError as exc:  # e.g. WRONGTYPE: not a string value
            notes.append(f"heartbeat {key}: cannot be read as a document ({printable(exc, 80)}); skipped")
            continue
        if raw is None:
            if size > MAX_NODE_DOC_BYTES:
                notes.append(f"heartbeat {key}: {size} bytes, over {MAX_NODE_DOC_BYTES}; skipped")
            continue  # expired between the scan and the read
        problem, doc = _node_doc(raw)
        if problem:
            notes.append(f"heartbeat {key}: {problem}; skipped")
            continue
        doc["ttl_left_s"] = ttl
        nodes[doc["worker"]] = doc
    return nodes


def _node_doc(raw: bytes) -> tuple[str | None, dict]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return "not JSON", {}
    if not isinstance(doc, dict):
        return f"a JSON {type(doc).__name__}, not an object", {}
    for name, types in NODE_FIELDS.items():
        if not isinstance(doc.get(name), types):
            return f"'{name}' is missing or not {' or '.join(t.__name__ for t in types)}", {}
    if not doc["worker"] or any(not isinstance(q, str) for q in doc["queues"] or []):
        return "'worker' is empty or 'queues' holds a non-string", {}
    return None, doc


def _workers(conn, nodes: dict[str, dict], notes: list[str]) -> list[dict]:
    """RQ's worker records joined with their heartbeats (taken out of `nodes`); unreadable ones noted."""
    import redis
    from rq import Worker

    workers = []
    for key in Worker.all_keys(connection=conn):
        try:
            worker = Worker.find_by_key(key, connection=conn, serializer=serializer())
            if worker is not None:
                workers.append(_worker_doc(worker, nodes.get(worker.name)))
                nodes.pop(worker.name, None)
        except (ValueError, TypeError, KeyError, UnicodeDecodeError, redis.exceptions.ResponseError) as exc:
            notes.append(f"worker record {printable(key, 120)}: unreadable ({printable(exc, 80)}); skipped")
    return workers


def _worker_doc(worker, node: dict | None) -> dict:
    return {
        "name": worker.name if worker else node.get("worker"),
        "state": str(getattr(worker.get_state(), "value", worker.get_state())) if worker else node.get("state"),
        "current_job": (worker.get_current_job_id() if worker else None) or (node or {}).get("current_job"),
        "queues": worker.queue_names() if worker else node.get("queues"),
        "last_heartbeat": (node or {}).get("heartbeat_at")
        or (worker.last_heartbeat.isoformat() if worker and worker.last_heartbeat else None),
        "alive": node is not None,
        "successful_jobs": worker.successful_job_count if worker else None,
        "failed_jobs": worker.failed_job_count if worker else None,
        "node": node,
    }
