"""Cloud Hypervisor's event monitor (``--event-monitor path=<file>``), read back.

CH writes each event as a pretty-printed JSON object followed by a blank line (the
``event_monitor`` crate: ``serde_json::to_string_pretty`` of ``{timestamp, source, event,
properties}``, ``timestamp`` a Rust ``Duration``: ``{"secs": .., "nanos": ..}`` since the VMM
started). The file is in the task's runtime directory, so what the guest did while no plugin
ran is still there for the next one (it is only truncated when CH starts).

The events this backend acts on (``vmm/src/lib.rs``, ``devices/src/pvpanic.rs``):
``guest``/``panic`` (pvpanic; ``properties.event`` is ``panicked`` or ``crash_loaded``),
``vm``/``shutdown`` (the VM was torn down: by the guest powering off, which with
``--no-shutdown`` leaves the VMM running, or on the way out of the VMM), ``vm``/``rebooting``
and ``vm``/``rebooted`` (the guest reset; CH rebuilds the VM in place), ``vm``/``deleted`` and
``vmm``/``shutdown`` (the VMM is ending).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

# A file of events is small (a few per boot); one bigger than this is not CH's.
MAX_READ = 4 * 1024 * 1024
_DECODER = json.JSONDecoder()


class EventFormatError(ValueError):
    """The file holds something that is not CH's event stream."""


@dataclass(frozen=True)
class MonitorEvent:
    source: str
    event: str
    # Seconds since the VMM started.
    seconds: float = 0.0
    properties: Mapping[str, str] = field(default_factory=dict)

    def is_(self, source: str, event: str) -> bool:
        return self.source == source and self.event == event


def parse_events(text: str) -> tuple[list[MonitorEvent], int]:
    """The complete events at the start of ``text``, and how many characters they took (an
    event CH is still writing is left for the next read)."""
    events: list[MonitorEvent] = []
    pos = 0
    while True:
        start = _skip_space(text, pos)
        if start == len(text):
            return events, start
        try:
            raw, end = _DECODER.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            if _incomplete(text, start):
                return events, pos
            raise EventFormatError(f"not an event at character {start}: {exc.msg}") from exc
        events.append(_event(raw, start))
        pos = end


def _event(raw: object, at: int) -> MonitorEvent:
    if not isinstance(raw, dict):
        raise EventFormatError(f"not an event object at character {at}")
    source, event = raw.get("source"), raw.get("event")
    if not isinstance(source, str) or not isinstance(event, str):
        raise EventFormatError(f"event without source and event at character {at}")
    stamp = raw.get("timestamp") or {}
    seconds = 0.0
    if isinstance(stamp, dict):
        seconds = float(stamp.get("secs", 0)) + float(stamp.get("nanos", 0)) / 1e9
    props = raw.get("properties") or {}
    if not isinstance(props, dict):
        raise EventFormatError(f"event properties are not an object at character {at}")
    return MonitorEvent(source, event, seconds, {str(k): str(v) for k, v in props.items()})


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _incomplete(text: str, start: int) -> bool:
    """An object cut short by the end of what was read (CH is mid-write), not a bad one: every
    complete event ends with a blank line, so a cut one has none after its start."""
    return "\n\n" not in text[start:]


class EventFile:
    """Reads the event file as it grows: each ``read_new`` returns the events added since."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._pending = b""

    def read_new(self) -> list[MonitorEvent]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read(MAX_READ)
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        data = self._pending + chunk
        text = data.decode("utf-8", errors="replace")
        events, used = parse_events(text)
        self._pending = text[used:].encode()
        return events

    def read_all(self) -> list[MonitorEvent]:
        """Every event in the file, from the start (after a reattach)."""
        self._offset = 0
        self._pending = b""
        return self.read_new()
