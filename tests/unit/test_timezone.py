"""`timezone` against the zone database (zoneinfo), wherever a time zone is accepted."""

from __future__ import annotations

import zoneinfo
from collections.abc import Iterator

import pytest

from nomad_vm.cloudinit import render
from nomad_vm.cloudinit.model import CloudInitRequest
from nomad_vm.cloudinit.timezone import check_timezone
from nomad_vm.cloudinit.userdoc import parse_user_data
from nomad_vm.errors import ConfigError

FIELD = "config.timezone"


@pytest.mark.parametrize(
    "name", ["Europe/Berlin", "UTC", "America/Argentina/Buenos_Aires", "Etc/GMT+5"]
)
def test_zones_of_the_database_are_accepted(name: str) -> None:
    assert check_timezone(name, FIELD) == name


@pytest.mark.parametrize(
    "name",
    [
        "Mars/Olympus",
        "Europe",  # a directory of the database, not a zone
        "zone.tab",  # a file of the database, not a zone
        "localtime",  # Debian's link to the host's own setting
        "posixrules",
        "../etc/passwd",
        "/etc/localtime",
        "Europe/../etc/passwd",
        "Etc/GMT;reboot",
        "a b",
        "",
        "nul\0byte",
    ],
)
def test_names_that_are_not_zones_are_refused_naming_the_field(name: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_timezone(name, FIELD)
    assert err.value.field == FIELD
    assert "is not a time zone of the IANA time zone database" in err.value.reason
    assert "Europe/Berlin or UTC" in err.value.reason


def test_a_wrong_case_gets_the_right_name_suggested() -> None:
    with pytest.raises(ConfigError) as err:
        check_timezone("europe/berlin", FIELD)
    assert "(did you mean Europe/Berlin?)" in err.value.reason


def test_a_typo_gets_close_names_suggested() -> None:
    with pytest.raises(ConfigError) as err:
        check_timezone("Europe/Berln", FIELD)
    assert "did you mean Europe/Berlin" in err.value.reason


@pytest.fixture
def without_host_database() -> Iterator[None]:
    """zoneinfo as on a host without /usr/share/zoneinfo: only the tzdata package is left."""
    zoneinfo.reset_tzpath(to=[])
    zoneinfo.ZoneInfo.clear_cache()
    try:
        yield
    finally:
        zoneinfo.reset_tzpath()
        zoneinfo.ZoneInfo.clear_cache()


def test_the_tzdata_package_serves_a_host_without_a_database(without_host_database: None) -> None:
    """pyproject depends on tzdata for exactly this."""
    assert zoneinfo.TZPATH == ()
    assert check_timezone("Europe/Berlin", FIELD) == "Europe/Berlin"
    with pytest.raises(ConfigError):
        check_timezone("Mars/Olympus", FIELD)


def test_no_database_at_all_is_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(key: str) -> None:
        raise zoneinfo.ZoneInfoNotFoundError(key)

    monkeypatch.setattr(zoneinfo, "ZoneInfo", missing)
    with pytest.raises(ConfigError) as err:
        check_timezone("Europe/Berlin", FIELD)
    assert "no time zone database" in err.value.reason and "tzdata" in err.value.reason


def test_the_task_option_is_checked_when_the_seed_is_rendered() -> None:
    request = CloudInitRequest(instance_id="i", hostname="h", timezone="Mars/Olympus")
    with pytest.raises(ConfigError) as err:
        render(request)
    assert err.value.field == FIELD and "'Mars/Olympus'" in err.value.reason


def test_the_user_documents_timezone_is_checked_naming_its_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse_user_data("#cloud-config\npackages: [nginx]\ntimezone: Mars/Olympus\n")
    assert err.value.field == "config.user_data"
    assert err.value.reason.startswith("line 3: timezone: 'Mars/Olympus' is not a time zone")
    with pytest.raises(ConfigError) as err:
        parse_user_data("#cloud-config\ntimezone: [UTC]\n")
    assert err.value.reason == "line 2: timezone: must be a zone name like Europe/Berlin"
    assert parse_user_data("#cloud-config\ntimezone: Europe/Berlin\n") is not None
