"""Cloud Hypervisor's event-monitor stream, read back: the format its event_monitor crate writes
(pretty-printed JSON objects, each followed by a blank line, the timestamp a Rust Duration),
read as it grows, with an event cut short left for the next read."""

from __future__ import annotations

from pathlib import Path

import pytest

from nomad_vm.vm.cloud_hypervisor.events import (
    EventFile,
    EventFormatError,
    MonitorEvent,
    parse_events,
)

# As CH writes it (serde_json::to_string_pretty, then "\n\n"): properties null or an object.
STREAM = """{
  "timestamp": {
    "secs": 0,
    "nanos": 27432
  },
  "source": "vmm",
  "event": "starting",
  "properties": null
}

{
  "timestamp": {
    "secs": 1,
    "nanos": 500000000
  },
  "source": "guest",
  "event": "panic",
  "properties": {
    "event": "panicked"
  }
}

"""


def test_the_documented_stream_parses() -> None:
    events, used = parse_events(STREAM)
    assert used == len(STREAM)
    assert events == [
        MonitorEvent("vmm", "starting", 0.000027432, {}),
        MonitorEvent("guest", "panic", 1.5, {"event": "panicked"}),
    ]
    assert events[1].is_("guest", "panic") and not events[1].is_("vm", "panic")


def test_an_event_cut_short_waits_for_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    cut = STREAM.index('"source": "guest"')
    path.write_text(STREAM[:cut])
    reader = EventFile(path)
    assert [e.event for e in reader.read_new()] == ["starting"]
    with open(path, "a") as f:
        f.write(STREAM[cut:])
    assert [e.event for e in reader.read_new()] == ["panic"]
    assert reader.read_new() == []
    # After a plugin restart: everything again, from the start.
    assert [e.event for e in reader.read_all()] == ["starting", "panic"]


def test_a_missing_file_has_no_events_yet(tmp_path: Path) -> None:
    assert EventFile(tmp_path / "none").read_new() == []


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]\n\n",
        '{"source": "vm"}\n\n',
        '{"source": "vm", "event": "x", "properties": [1]}\n\n',
        "not json at all\n\n",
    ],
)
def test_what_is_not_chs_stream_is_an_error(text: str) -> None:
    with pytest.raises(EventFormatError):
        parse_events(text)
