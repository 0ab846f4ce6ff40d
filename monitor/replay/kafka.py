"""A Kafka topic's history as replay input: a range of offsets or times, read without a consumer group.

The consumer has no group id: it assigns itself the partitions, seeks, reads, and never commits, so a
replay cannot move a live group's offsets. The end of the range is fixed when the replay starts (the
end offsets then, or ``--to``): records produced meanwhile are not chased.

Partitions are merged into one stream by record timestamp (then partition, then offset), so the same
range gives the same order however the fetches happened to interleave. A time bound is applied to
each record's timestamp here and to each event's own time in the pipeline: some brokers answer
``offsets_for_times`` badly (Tansu answered offset 0 with timestamp -1), so the offsets it returns are
only a place to start reading.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterator

from monitor.config import Config
from monitor.errors import InferWatchError

log = logging.getLogger("inferwatch.replay")

_OFFSETS = re.compile(r"^\s*\d+\s*:\s*\d+\s*(,\s*\d+\s*:\s*\d+\s*)*$")
BUFFER_PER_PARTITION = 50_000  # records fetched ahead per partition before it is paused
# A record's timestamp (when it was produced) trails its event's time: a time bound drops records by
# their timestamp only beyond this margin; the exact bound is on the event's own time.
RECORD_SLACK_MS = 300_000


@dataclass(frozen=True)
class Bound:
    """One end of a replay range: an event time (epoch seconds) or offsets per partition (inclusive)."""

    time: float | None = None
    offsets: dict[int, int] | None = None

    def describe(self) -> Any:
        if self.offsets is not None:
            return {str(p): o for p, o in sorted(self.offsets.items())}
        return self.time


def parse_bound(text: str, flag: str) -> Bound:
    """``2025-11-27T08:00:00Z`` (RFC 3339), ``1764230400`` (epoch seconds) or ``0:1200,1:1180``
    (partition:offset pairs)."""
    text = text.strip()
    if _OFFSETS.match(text):
        offsets = {}
        for pair in text.split(","):
            partition, offset = (int(x) for x in pair.split(":"))
            offsets[partition] = offset
        return Bound(offsets=offsets)
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not 0 <= seconds < 4_102_444_800:  # 1970 to 2100, as event times (NaN fails too)
            raise InferWatchError(f"{flag} {text!r}: epoch seconds between 0 and 4102444800 (2100) expected")
        return Bound(time=seconds)
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise InferWatchError(f"{flag} {text!r}: expected an RFC 3339 time (2025-11-27T08:00:00Z), epoch "
                              "seconds (1764230400) or partition:offset pairs (0:1200,1:1180)") from None
    if moment.tzinfo is None:
        raise InferWatchError(f"{flag} {text!r}: give a time zone (Z or +01:00): a replay must not depend on "
                              "the machine's")
    return Bound(time=moment.astimezone(timezone.utc).timestamp())


class KafkaRange:
    """The records of ``topic`` between two bounds, in batches, merged across partitions."""

    def __init__(self, config: Config, topic: str, start: Bound | None, end: Bound | None, batch_size: int):
        from kafka import KafkaConsumer, TopicPartition

        from monitor.sources.kafka import client_settings, construct

        self.topic = topic
        self.start, self.end = start, end
        self.batch_size = batch_size
        self.bootstrap = ",".join(config.kafka.bootstrap_servers)
        try:
            self.consumer = construct(
                KafkaConsumer, **{**client_settings(config), "client_id": f"{config.kafka.client_id}-replay"},
                group_id=None, enable_auto_commit=False, auto_offset_reset="earliest", request_timeout_ms=30_000,
                max_partition_fetch_bytes=max(1_048_576, config.limits.max_message_bytes + 1024))
        except Exception as exc:  # NoBrokersAvailable, a rejected setting
            reason = str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
            raise InferWatchError(f"Kafka at {self.bootstrap}: cannot connect ({reason})") from None
        partitions = self.consumer.partitions_for_topic(topic)
        if not partitions:
            self.consumer.close()
            raise InferWatchError(f"Kafka at {self.bootstrap}: no topic {topic!r} (or it has no partitions)")
        self.partitions = [TopicPartition(topic, p) for p in sorted(partitions)]
        for bound, flag in ((start, "--from"), (end, "--to")):
            if bound is not None and bound.offsets is not None:
                unknown = sorted(set(bound.offsets) - set(partitions))
                if unknown:
                    self.consumer.close()
                    raise InferWatchError(f"{flag}: topic {topic} has no partition {unknown[0]} "
                                          f"(it has {', '.join(map(str, sorted(partitions)))})")
        self.consumer.assign(self.partitions)
        self.first, self.stop = self._range()
        self.digests = {tp.partition: hashlib.sha256() for tp in self.partitions}
        self.counts = {tp.partition: 0 for tp in self.partitions}
        self.seen = {tp.partition: [None, None] for tp in self.partitions}  # first and last offset read
        self.read_records = 0

    def _range(self) -> tuple[dict[Any, int], dict[Any, int]]:
        """Per partition: the first offset to read and the offset to stop before (fixed now)."""
        begin = self.consumer.beginning_offsets(self.partitions)
        end = self._ends(begin, self.consumer.end_offsets(self.partitions))
        first = dict(begin)
        stop = dict(end)
        if self.start is not None and self.start.offsets is not None:
            for tp in self.partitions:
                if tp.partition in self.start.offsets:
                    first[tp] = max(begin[tp], self.start.offsets[tp.partition])
        elif self.start is not None and self.start.time is not None:
            found = self.consumer.offsets_for_times({tp: int(self.start.time * 1000) for tp in self.partitions})
            for tp, answer in found.items():
                # An answer without a real timestamp is no answer: read from the beginning and filter.
                if answer is None:
                    first[tp] = end[tp]
                elif answer.timestamp is not None and answer.timestamp >= 0:
                    first[tp] = max(begin[tp], answer.offset)
        if self.end is not None and self.end.offsets is not None:
            for tp in self.partitions:
                if tp.partition in self.end.offsets:
                    stop[tp] = min(end[tp], self.end.offsets[tp.partition] + 1)
        for tp in self.partitions:
            self.consumer.seek(tp, first[tp])
        return first, stop

    def _ends(self, begin: dict[Any, int], listed: dict[Any, int]) -> dict[Any, int]:
        """The end offset of each partition now. ``end_offsets`` alone is not trusted: Tansu answered
        the base offset of the last record batch (2,575 for 3,000 records), so the high watermark of
        a fetch near the end is taken where it is larger."""
        for tp in self.partitions:
            self.consumer.seek(tp, max(begin[tp], listed[tp] - 1))
        ends = dict(listed)
        deadline = time.monotonic() + 5
        known: set[Any] = set()
        while len(known) < len(self.partitions) and time.monotonic() < deadline:
            self.consumer.poll(timeout_ms=500, max_records=1)
            for tp in self.partitions:
                high = self.consumer.highwater(tp)
                if high is not None:
                    ends[tp] = max(ends[tp], high)
                    known.add(tp)
        return ends

    @property
    def total(self) -> int:
        """Records in the range (before the time filters): for the progress bar."""
        return sum(max(0, self.stop[tp] - self.first[tp]) for tp in self.partitions)

    def batches(self) -> Iterator[list[Any]]:
        """Batches of records in (timestamp, partition, offset) order."""
        buffers: dict[Any, list[Any]] = {tp: [] for tp in self.partitions}
        positions = {tp: 0 for tp in self.partitions}  # index of the next record in each buffer
        open_parts = {tp for tp in self.partitions if self.first[tp] < self.stop[tp]}
        heap: list[tuple[int, int, int, Any]] = []
        batch: list[Any] = []
        end_ms = None if self.end is None or self.end.time is None else self.end.time * 1000
        start_ms = None if self.start is None or self.start.time is None else self.start.time * 1000
        try:
            while True:
                # Every open partition must have its next record in the heap before the smallest can go.
                waiting = [tp for tp in open_parts if positions[tp] >= len(buffers[tp])]
                if waiting:
                    self._fetch(waiting, buffers, positions, open_parts)
                    for tp in waiting:
                        if positions[tp] < len(buffers[tp]):
                            r = buffers[tp][positions[tp]]
                            heapq.heappush(heap, (_ts(r), r.partition, r.offset, tp))
                    continue
                if not heap:
                    break
                _, _, _, tp = heapq.heappop(heap)
                r = buffers[tp][positions[tp]]
                positions[tp] += 1
                if positions[tp] < len(buffers[tp]):
                    nxt = buffers[tp][positions[tp]]
                    heapq.heappush(heap, (_ts(nxt), nxt.partition, nxt.offset, tp))
                elif r.offset + 1 >= self.stop[tp]:
                    open_parts.discard(tp)
                stamp = _ts(r)
                if stamp >= 0 and ((start_ms is not None and stamp < start_ms - RECORD_SLACK_MS)
                                   or (end_ms is not None and stamp > end_ms + RECORD_SLACK_MS)):
                    continue  # far outside the range by its record timestamp: not read, not digested
                self._count(r)
                batch.append(r)
                if len(batch) >= self.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
        finally:
            self.consumer.close()

    def _fetch(self, waiting: list[Any], buffers: dict, positions: dict, open_parts: set) -> None:
        """Poll until each partition in ``waiting`` has records (or is done)."""
        for tp in waiting:
            buffers[tp] = []
            positions[tp] = 0
        others = [tp for tp in self.partitions if tp not in waiting]
        self.consumer.pause(*others)
        self.consumer.resume(*waiting)
        empty_polls = 0
        while any(positions[tp] >= len(buffers[tp]) for tp in waiting if tp in open_parts):
            polled = self.consumer.poll(timeout_ms=1000, max_records=BUFFER_PER_PARTITION)
            for tp in waiting:
                if tp in open_parts and positions[tp] >= len(buffers[tp]) and tp not in polled \
                        and self.consumer.position(tp) >= self.stop[tp]:
                    open_parts.discard(tp)  # a transaction marker or compacted records end the range
            if not polled:
                empty_polls += 1
                if empty_polls >= 30:
                    late = ", ".join(f"{tp.partition}@{self.consumer.position(tp)}" for tp in waiting
                                     if tp in open_parts and positions[tp] >= len(buffers[tp]))
                    raise InferWatchError(f"Kafka at {self.bootstrap}: no records from partitions {late} for 30 s, "
                                          "though the range goes further (broker down, or records deleted?)")
                continue
            empty_polls = 0
            for tp, records in polled.items():
                keep = [r for r in records if r.offset < self.stop[tp]]
                buffers[tp].extend(keep)
                if len(keep) < len(records) or (keep and keep[-1].offset + 1 >= self.stop[tp]):
                    self.consumer.pause(tp)
                elif len(buffers[tp]) - positions[tp] >= BUFFER_PER_PARTITION:
                    self.consumer.pause(tp)
            for tp in waiting:
                if tp in open_parts and positions[tp] >= len(buffers[tp]) and self.consumer.position(tp) >= self.stop[tp]:
                    open_parts.discard(tp)  # compacted or deleted records: nothing more below the stop

    def _count(self, r: Any) -> None:
        self.read_records += 1
        p = r.partition
        self.counts[p] += 1
        seen = self.seen[p]
        if seen[0] is None:
            seen[0] = r.offset
        seen[1] = r.offset
        digest = self.digests[p]
        digest.update(f"{r.offset}:{len(r.value or b'')}:".encode())
        digest.update(r.value or b"")

    def describe(self) -> dict[str, Any]:
        """The input's entry in the report: the range read and a digest of every record in it."""
        whole = hashlib.sha256()
        partitions = {}
        for tp in self.partitions:
            p = tp.partition
            hexdigest = self.digests[p].hexdigest()
            whole.update(f"{p}:{hexdigest}\n".encode())
            partitions[str(p)] = {"first_offset": self.seen[p][0], "last_offset": self.seen[p][1],
                                  "records": self.counts[p], "sha256": hexdigest}
        return {"kind": "kafka", "topic": self.topic, "bootstrap": self.bootstrap, "partitions": partitions,
                "records": self.read_records, "sha256": whole.hexdigest()}


def _ts(record: Any) -> int:
    """A record's timestamp in ms; -1 where the broker kept none."""
    return record.timestamp if record.timestamp is not None else -1
