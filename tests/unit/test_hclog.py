"""Tests for nomad_vm.plugin.hclog: lines go-plugin's parseJSON accepts, and a handler that
survives the Nomad agent going away."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from nomad_vm.errors import ConfigError
from nomad_vm.plugin.hclog import (
    LOG_FILE_ENV,
    MAX_LINE_CHARS,
    OFF,
    TRACE,
    HclogJSONFormatter,
    SafeFdHandler,
    configure_plugin_logging,
    fields,
    format_timestamp,
    hclog_level,
    parse_log_level,
)

# Equivalent of Go's time.Parse("2006-01-02T15:04:05.000000Z07:00", ...).
GO_LAYOUT = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
HCLOG_LEVELS = {"trace", "debug", "info", "warn", "error"}


def go_parse(line: str) -> dict[str, object]:
    """What go-plugin's parseJSON needs to neither panic nor fall back to a raw DEBUG line."""
    assert "\n" not in line
    assert len(line.encode()) < 64 * 1024
    entry = json.loads(line)
    assert isinstance(entry, dict)
    for key in ("@message", "@level", "@timestamp"):
        assert isinstance(entry[key], str), key  # a non-string panics the Nomad agent
    assert entry["@level"] in HCLOG_LEVELS
    assert GO_LAYOUT.match(entry["@timestamp"]), entry["@timestamp"]
    return entry


def make_record(
    msg: object = "hello",
    *,
    level: int = logging.INFO,
    name: str = "nomad_vm.test",
    args: tuple[object, ...] = (),
    extra: dict[str, object] | None = None,
    exc_info: object = None,
) -> logging.LogRecord:
    logger = logging.getLogger(name)
    return logger.makeRecord(name, level, __file__, 1, msg, args, exc_info, extra=extra)  # type: ignore[arg-type]


def fmt(record: logging.LogRecord) -> dict[str, object]:
    return go_parse(HclogJSONFormatter().format(record))


# --------------------------------------------------------------------------------------------
# Timestamp and the @ fields.


def test_timestamp_with_zero_microseconds() -> None:
    record = make_record()
    record.created = 1_700_000_000.0
    entry = fmt(record)
    assert entry["@timestamp"] == "2023-11-14T22:13:20.000000Z"


@pytest.mark.parametrize(
    ("created", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000000Z"),
        (1_700_000_000.5, "2023-11-14T22:13:20.500000Z"),
        (1_700_000_000.000001, "2023-11-14T22:13:20.000001Z"),
        (951_782_400.25, "2000-02-29T00:00:00.250000Z"),
    ],
)
def test_format_timestamp(created: float, expected: str) -> None:
    assert format_timestamp(created) == expected
    assert GO_LAYOUT.match(expected)


def test_now_matches_go_layout() -> None:
    for _ in range(50):
        assert GO_LAYOUT.match(str(fmt(make_record())["@timestamp"]))


def test_basic_fields() -> None:
    entry = fmt(make_record("started %s on %d", args=("vm", 3), name="nomad_vm.driver"))
    assert entry["@message"] == "started vm on 3"
    assert entry["@module"] == "nomad_vm.driver"
    assert entry["@level"] == "info"


@pytest.mark.parametrize(
    ("levelno", "name"),
    [
        (TRACE, "trace"),
        (1, "trace"),
        (logging.DEBUG, "debug"),
        (15, "debug"),
        (logging.INFO, "info"),
        (logging.WARNING, "warn"),
        (logging.ERROR, "error"),
        (logging.CRITICAL, "error"),
    ],
)
def test_level_mapping(levelno: int, name: str) -> None:
    assert hclog_level(levelno) == name
    assert fmt(make_record(level=levelno))["@level"] == name


def test_trace_level_name_registered() -> None:
    assert logging.getLevelName(TRACE) == "TRACE"


def test_multiline_message_stays_one_line() -> None:
    entry = fmt(make_record("line one\nline two\r\n\u2028end"))
    assert entry["@message"] == "line one\nline two\r\n\u2028end"


def test_non_string_message_and_bad_args() -> None:
    assert fmt(make_record(12345))["@message"] == "12345"
    entry = fmt(make_record("needs %d and %d", args=("x",)))
    assert "needs %d and %d" in str(entry["@message"])


# --------------------------------------------------------------------------------------------
# Extra fields.


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_odd_field_types_serialise() -> None:
    odd: dict[object, object] = {
        "path": Path("/var/lib/nomad"),
        "raw": b"\xff\xfeabc",
        "exc": ValueError("bad disk"),
        "dec": Decimal("0.1"),
        "nan": float("nan"),
        "inf": float("-inf"),
        "big": 2**80,
        "small": 42,
        "ratio": 0.5,
        "flag": True,
        "nothing": None,
        "items": [1, Path("/x")],
        "broken": Unprintable(),
        "surrogate": "bad\udcff",
        7: "int key",
    }
    entry = fmt(make_record(extra=fields(**{str(k): v for k, v in odd.items()})))
    assert entry["path"] == "/var/lib/nomad"
    assert entry["raw"] == "\\xff\\xfeabc"
    assert entry["exc"] == "ValueError: bad disk"
    assert entry["dec"] == "0.1"
    assert entry["nan"] == "nan" and entry["inf"] == "-inf"
    assert entry["big"] == str(2**80)
    assert entry["small"] == 42 and entry["ratio"] == 0.5 and entry["flag"] is True
    assert entry["nothing"] is None
    assert entry["items"] == "[1, PosixPath('/x')]"
    assert entry["broken"] == "<unprintable Unprintable>"
    assert entry["surrogate"] == "bad\udcff"
    assert entry["7"] == "int key"


def test_fields_cannot_replace_reserved_keys() -> None:
    hostile = {"@level": 3, "@message": None, "@timestamp": {"x": 1}, "@module": 5}
    entry = fmt(make_record("real", extra={"fields": hostile}))
    assert entry["@message"] == "real"
    assert entry["@level"] == "info"
    assert entry["@module"] == "nomad_vm.test"
    assert entry["_@level"] == 3
    assert entry["_@timestamp"] == "{'x': 1}"


def test_fields_that_are_not_a_mapping_are_ignored() -> None:
    entry = fmt(make_record(extra={"fields": ["a", "b"]}))
    assert set(entry) == {"@message", "@level", "@timestamp", "@module"}


def test_exception_becomes_error_field() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        record = make_record("boom", level=logging.ERROR, exc_info=sys.exc_info())
    entry = fmt(record)
    assert entry["@message"] == "boom"
    assert "Traceback" in str(entry["error"])
    assert "ZeroDivisionError: division by zero" in str(entry["error"])


def test_exception_does_not_clobber_user_error_field() -> None:
    try:
        raise OSError("disk")
    except OSError:
        record = make_record("x", extra=fields(error="mine"), exc_info=sys.exc_info())
    entry = fmt(record)
    assert entry["error"] == "mine"
    assert "OSError: disk" in str(entry["error_2"])


def test_long_lines_fit_go_plugin_buffer() -> None:
    entry = fmt(make_record("m" * 200_000, extra=fields(blob="é" * 50_000)))
    assert str(entry["@message"]).endswith("...[truncated]")
    line = HclogJSONFormatter().format(make_record("m" * 200_000))
    assert len(line) <= MAX_LINE_CHARS


def test_thousands_of_fields_still_fit() -> None:
    many = {f"key_{i:05d}": i for i in range(10_000)}
    entry = fmt(make_record("many", extra={"fields": many}))
    assert str(entry["@message"]).startswith("many")


# --------------------------------------------------------------------------------------------
# parse_log_level.


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("trace", TRACE),
        ("TRACE", TRACE),
        ("Debug", logging.DEBUG),
        (" info ", logging.INFO),
        ("WARN", logging.WARNING),
        ("error", logging.ERROR),
        ("OFF", OFF),
    ],
)
def test_parse_log_level(name: str, level: int) -> None:
    assert parse_log_level(name) == level


@pytest.mark.parametrize("name", ["", "verbose", "warning", "critical", "5"])
def test_parse_log_level_rejects(name: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_log_level(name)
    assert info.value.field == "log_level"


# --------------------------------------------------------------------------------------------
# The handler.


def _logger_with(handler: logging.Handler, name: str) -> logging.Logger:
    handler.setFormatter(HclogJSONFormatter())
    logger = logging.getLogger(name)
    logger.handlers = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger


def test_handler_writes_lines_to_fd() -> None:
    r, w = os.pipe()
    handler = SafeFdHandler(w)
    logger = _logger_with(handler, "nomad_vm.test.pipe")
    logger.info("one", extra=fields(n=1))
    logger.warning("two")
    handler.close()
    with os.fdopen(r, "rb") as reader:
        lines = reader.read().decode().splitlines()
    assert [go_parse(line)["@message"] for line in lines] == ["one", "two"]


def test_handler_survives_closed_pipe(capfd: pytest.CaptureFixture[str]) -> None:
    r, w = os.pipe()
    os.close(r)  # the Nomad agent died
    handler = SafeFdHandler(w)
    logger = _logger_with(handler, "nomad_vm.test.epipe")
    for i in range(20):
        logger.error("record %d", i)  # BrokenPipeError inside, never outside
    assert handler.fd is None
    handler.close()
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no traceback spam either


def test_handler_falls_back_to_file_after_epipe(tmp_path: Path) -> None:
    log_file = tmp_path / "plugin.log"
    r, w = os.pipe()
    handler = SafeFdHandler(w, fallback_path=str(log_file))
    logger = _logger_with(handler, "nomad_vm.test.fallback")
    logger.info("before")
    os.close(r)
    logger.info("after 1")
    logger.info("after 2")
    handler.close()
    lines = log_file.read_text().splitlines()
    assert [go_parse(line)["@message"] for line in lines] == ["after 1", "after 2"]


def test_unwritable_fallback_is_silent(tmp_path: Path) -> None:
    handler = SafeFdHandler(None, fallback_path=str(tmp_path / "missing" / "plugin.log"))
    logger = _logger_with(handler, "nomad_vm.test.nofallback")
    logger.info("dropped")
    logger.info("dropped too")
    handler.close()


def test_handler_with_bad_fd_is_silent() -> None:
    handler = SafeFdHandler(987_654)  # EBADF
    logger = _logger_with(handler, "nomad_vm.test.ebadf")
    logger.info("dropped")
    assert handler.fd is None


# --------------------------------------------------------------------------------------------
# configure_plugin_logging.


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        if isinstance(handler, SafeFdHandler):
            handler.close()
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    logging.captureWarnings(False)


@pytest.mark.usefixtures("restore_root")
def test_configure_writes_only_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    configure_plugin_logging("info")
    log = logging.getLogger("nomad_vm.test.configured")
    log.debug("hidden")
    log.info("shown", extra=fields(task_id="abc"))
    log.log(TRACE, "hidden too")
    out, err = capfd.readouterr()
    assert out == ""
    entries = [go_parse(line) for line in err.splitlines()]
    assert [e["@message"] for e in entries] == ["shown"]
    assert entries[0]["task_id"] == "abc"
    assert entries[0]["@module"] == "nomad_vm.test.configured"


@pytest.mark.usefixtures("restore_root")
def test_configure_twice_keeps_one_handler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(LOG_FILE_ENV, "/tmp/nomad-vm-test.log")
    configure_plugin_logging("trace")
    configure_plugin_logging("debug")
    root = logging.getLogger()
    assert len(root.handlers) == 1
    handler = root.handlers[0]
    assert isinstance(handler, SafeFdHandler)
    assert handler.fallback_path == "/tmp/nomad-vm-test.log"
    assert root.level == logging.DEBUG


def test_configure_rejects_unknown_level() -> None:
    with pytest.raises(ConfigError):
        configure_plugin_logging("loud")


CHILD = textwrap.dedent(
    """
    import logging, sys
    from nomad_vm.plugin.hclog import configure_plugin_logging
    configure_plugin_logging("trace")
    log = logging.getLogger("nomad_vm.child")
    sys.stdin.readline()  # wait until the parent closed our stderr's read end
    for i in range(200):
        log.info("record %d", i)
    try:
        1 / 0
    except ZeroDivisionError:
        log.exception("with traceback")
    print("alive", flush=True)
    """
)


def test_process_survives_agent_death(tmp_path: Path) -> None:
    log_file = tmp_path / "fallback.log"
    env = dict(os.environ, **{LOG_FILE_ENV: str(log_file)})
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    child.stderr.close()
    child.stdin.write(b"go\n")
    child.stdin.close()
    out = child.stdout.read()
    assert child.wait(timeout=30) == 0
    assert out == b"alive\n"  # the handshake channel saw nothing from logging
    lines = log_file.read_text().splitlines()
    entries = [go_parse(line) for line in lines]
    assert len(entries) == 201
    assert "ZeroDivisionError" in str(entries[-1]["error"])
