"""Ingest on several processes (`medfound shard --workers N`) and in parts across machines (`--part I/N`).

Every reader walks a fixed, sorted list of inputs (table rows, files, slides, volumes, array rows) and asks its
`Ingested.wants(i)` before any work on input i. Part I of N takes the inputs with `i % N == I`; within a part,
worker w of W takes every W-th of them. Each worker process is forked from the process that built the reader (so a
reader's setup, e.g. hashing every DICOM file for the salt, is done once), runs the same generator, and decodes,
de-identifies and encodes (PNG) its inputs. The parent merges the workers' encoded samples back **in input order**
and writes them as one process would: the shards and the manifest digest are byte-identical to `--workers 1`.

What a reader records on the side while it runs (skipped files with their reasons, de-identification counts,
modalities seen, slide bags) is sent back per input as the change it made, and applied in input order, so those
records are identical too. Duplicate DICOM instances are found where the streams merge (the first file written
wins, as in one process). Memory stays bounded: each worker has a bounded queue, and the parent holds at most one
input's samples at a time.

A worker that raises stops the ingest with the error, naming the input (the reader's own messages name the table
row or file); a worker that dies (killed, out of memory) is named with the input it was reading. Forking needs a
POSIX system; elsewhere `--workers` falls back to one process.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import os
import queue
import sys
import traceback
from collections import Counter
from typing import Any, Iterable, Iterator, Optional

from medfound.data.ingest import Ingested
from medfound.data.ingest.dicom import DUPLICATE_KEY, duplicate_reason
from medfound.data.journal import Journal
from medfound.data.manifest import LabelSchema
from medfound.data.shards import encode_sample
from medfound.process import die_with_parent

CHUNK = 32           # messages a worker sends at once
QUEUE_CHUNKS = 8     # chunks a worker may have in flight: the bound on memory per worker
_SIDE = ("skipped", "deidentification", "modalities", "bags")


def parse_part(text: Optional[str]) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; None -> (0, 1)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--part {text!r}: write it as I/N, e.g. 0/8 for the first of 8 parts") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--part {text}: I must be in 0..N-1 (parts are numbered from 0, as SLURM array tasks)")
    return i, n


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS
        return max(1, os.cpu_count() or 1)


def _side(ingested: Ingested) -> dict[str, Any]:
    return {k: copy.deepcopy(getattr(ingested, k)) for k in _SIDE}


def _delta(old: Any, new: Any) -> Any:
    """What one input changed in the reader's side records: numbers by difference, lists by their new tail, dicts
    key by key; anything else by its new value."""
    if isinstance(new, dict):
        old = old if isinstance(old, dict) else {}
        out = {}
        for k, v in new.items():
            d = _delta(old.get(k), v)
            if d not in (0, [], {}, None) or k not in old:
                out[k] = d
        return out
    if isinstance(new, list):
        return new[len(old or []):]
    if isinstance(new, (int, float)) and not isinstance(new, bool) and isinstance(old, (int, float)):
        return new - old
    return new


def _apply(target: Any, delta: Any) -> Any:
    if isinstance(delta, dict) and isinstance(target, dict):
        for k, d in delta.items():
            target[k] = _apply(target.get(k), d) if k in target else copy.deepcopy(d)
        return target
    if isinstance(delta, list) and isinstance(target, list):
        target.extend(delta)
        return target
    if isinstance(delta, (int, float)) and not isinstance(delta, bool) and isinstance(target, (int, float)):
        return target + delta
    return delta


def _put(out: Any, item: Any, parent: int) -> None:
    """`out.put(item)`, giving up (exiting) when the parent process is gone (killed): never a blocked orphan."""
    while True:
        try:
            out.put(item, timeout=5.0)
            return
        except queue.Full:
            if os.getppid() != parent:
                os._exit(1)


def _apply_side(ingested: Ingested, change: dict[str, Any]) -> None:
    for k, d in change.items():
        setattr(ingested, k, _apply(getattr(ingested, k), d))


def _worker(ingested: Ingested, stream: Iterable[dict], schema: LabelSchema, part: int, parts: int, worker: int,
            workers: int, out: Any, journal: Optional[Journal], parent: int) -> None:
    """Runs in a forked child: the reader's generator over this worker's inputs, encoded, sent in input order as
    ("rec", input, Encoded, instance) ... ("end", input, side-record change) per input, or ("skip", input) for one a
    resumed ingest already holds, then ("done",)."""

    die_with_parent(parent)  # a killed parent takes its workers with it (never an orphan blocked on its queue)
    buf: list[tuple] = []
    state = {"current": None, "count": 0, "before": None}

    def flush() -> None:
        if buf:
            _put(out, list(buf), parent)
            buf.clear()

    def finish() -> None:
        if state["current"] is not None:
            buf.append(("end", state["current"], _delta(state["before"], _side(ingested))))
            state["current"] = None
            if len(buf) >= CHUNK:
                flush()

    def select(i: int) -> bool:
        finish()
        if i % parts != part:
            return False
        j = state["count"]
        state["count"] += 1
        if j % workers != worker:
            return False
        if journal is not None and journal.skippable(i) is not None:
            buf.append(("skip", i))  # every sample of it is in a kept shard: not decoded again
            return False
        state["current"], state["before"] = i, _side(ingested)
        return True

    ingested.select = select
    try:
        for s in stream:
            instance = s.get(DUPLICATE_KEY)
            buf.append(("rec", state["current"], encode_sample(s, schema), instance))
            if len(buf) >= CHUNK:
                flush()
        finish()
        buf.append(("done",))
        flush()
    except BaseException as e:  # sent to the parent, which stops the ingest naming the input
        buf.clear()
        _put(out, [("error", state["current"], isinstance(e, ValueError), f"{type(e).__name__}: {e}",
                    "".join(traceback.format_exception(type(e), e, e.__traceback__))[-4000:])], parent)
    finally:
        out.close()
        out.join_thread()


def encoded_samples(ingested: Ingested, stream: Iterable[dict], schema: LabelSchema, *, workers: int = 1,
                    part: int = 0, parts: int = 1, journal: Optional[Journal] = None) -> Iterator[Any]:
    """The samples of `stream` (the reader's `ingested.samples`, possibly wrapped) for part `part` of `parts`, decoded
    and encoded by `workers` processes, in input order; `ingested`'s side records are filled as one process would.
    With a `journal` (a resumable ingest) every input's outcome is recorded there, and inputs a resumed journal
    already holds are skipped. With one worker, one part and no journal this is `stream` itself."""
    if workers <= 1 and parts == 1 and journal is None:
        return iter(stream)
    if "fork" not in mp.get_all_start_methods():  # pragma: no cover - Windows
        if journal is None and parts == 1:
            print("warning: --workers needs fork (POSIX); ingesting in one process", file=sys.stderr)
            return iter(stream)
        raise RuntimeError("--part and --resume need fork (a POSIX system)")
    return _merged(ingested, stream, schema, max(1, workers), part, parts, journal)


def _merged(ingested: Ingested, stream: Iterable[dict], schema: LabelSchema, workers: int, part: int,
            parts: int, journal: Optional[Journal]) -> Iterator[Any]:
    ctx = mp.get_context("fork")
    ingested.cross_process = True
    queues = [ctx.Queue(maxsize=QUEUE_CHUNKS) for _ in range(workers)]
    procs = [ctx.Process(target=_worker, args=(ingested, stream, schema, part, parts, w, workers, queues[w], journal,
                                               os.getpid()), daemon=True, name=f"medfound-ingest-{w}")
             for w in range(workers)]
    for p in procs:
        p.start()
    pending: list[list[tuple]] = [[] for _ in range(workers)]
    instances: dict[str, int] = {}
    last: list[Optional[int]] = [None] * workers  # the last input each worker finished

    def next_message(w: int) -> tuple:
        while not pending[w]:
            try:
                pending[w] = queues[w].get(timeout=5.0)
            except queue.Empty:
                if not procs[w].is_alive():
                    where = f"the input after input #{last[w]}" if last[w] is not None else "its first input"
                    raise RuntimeError(f"ingest worker {w} died (exit code {procs[w].exitcode}; killed, or out of "
                                       f"memory?) while reading {where}; nothing was written under --out. Rerun with "
                                       "fewer --workers, or --workers 1 to see that input's own error") from None
        return pending[w].pop(0)

    try:
        j = 0  # the j-th input of this part comes from worker j % workers; the first worker without one ends it
        while True:
            w = j % workers
            drop: Optional[tuple[str, str]] = None
            first, keys, token = True, [], None
            msg = next_message(w)
            if msg[0] == "done":
                break
            if msg[0] == "skip":  # a resumed ingest holds all of it: its recorded outcome stands in
                item = journal.items[msg[1]]  # type: ignore[union-attr]
                _apply_side(ingested, item["side"])
                if item.get("instance"):
                    instances[item["instance"]] = msg[1]
                last[w] = msg[1]
                j += 1
                continue
            while True:
                kind = msg[0]
                if kind == "rec":
                    _, i, enc, instance = msg
                    if first and instance is not None:  # a DICOM file: the first written copy of an instance wins
                        token, rel = instance
                        if token in instances:
                            drop = (rel, duplicate_reason(instances[token]))
                        else:
                            instances[token] = i
                    first = False
                    if drop is None:
                        key = enc.record["__key__"]
                        keys.append(key)
                        if journal is None or key not in journal.done_keys:  # else already in a kept shard
                            yield enc
                elif kind == "end":
                    _, i, change = msg
                    last[w] = i
                    if drop is not None:
                        rel, reason = drop
                        change = {"skipped": {"count": 1, "by_reason": {reason: 1},
                                              "files": [(f"input #{i}", rel, reason)]}}
                    _apply_side(ingested, change)
                    if journal is not None:
                        journal.add_item(i, keys, change, token if drop is None else None)
                    break
                elif kind == "error":
                    _, i, bad_input, text, trace = msg
                    where = f"input #{i}" if i is not None else "the reader"
                    # a reader's ValueError names the file or table row: it stays a ValueError, as in one process
                    raise (ValueError if bad_input else RuntimeError)(
                        f"ingest stopped at {where} (worker {w}): {text}; nothing was written under --out" +
                        ("" if bad_input else f"\n--- worker traceback ---\n{trace}"))
                else:
                    raise RuntimeError(f"ingest worker {w} sent {kind!r} inside an input (a medfound bug)")
                msg = next_message(w)
            j += 1
        if ingested.deidentification and isinstance(ingested.deidentification.get("dropped_values"), dict):
            ingested.deidentification["dropped_values"] = dict(sorted(ingested.deidentification["dropped_values"]
                                                                      .items()))
        if isinstance(ingested.modalities, dict) and not isinstance(ingested.modalities, Counter):
            ingested.modalities = Counter(ingested.modalities)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
        for q in queues:
            q.close()
            q.cancel_join_thread()
