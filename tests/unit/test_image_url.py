"""Images given by URL, as the task writes them (``storage.image_url``)."""

from __future__ import annotations

import pytest

from nomad_vm.errors import ConfigError
from nomad_vm.storage.image_url import UrlRules, image_source

SHA = "ab" * 32
RULES = UrlRules(("https", "http"), checksum_required=True)


def parse(value: str, checksum: str = "", rules: UrlRules = RULES):  # type: ignore[no-untyped-def]
    return image_source("config.image", value, checksum, "config.image_checksum", rules)


def test_a_path_is_no_url() -> None:
    assert parse("local/disk.qcow2") is None
    assert parse("/srv/images/disk.qcow2") is None


def test_the_go_getter_checksum_is_taken_and_not_sent() -> None:
    image = parse(f"https://images.example/d.qcow2?v=2&checksum=sha256:{SHA.upper()}")
    assert image is not None
    assert image.sha256 == SHA
    assert image.url == "https://images.example/d.qcow2?v=2"


def test_the_option_checksum_and_the_same_in_the_url_agree() -> None:
    image = parse(f"http://h/d?checksum=sha256:{SHA}", f"sha256:{SHA}")
    assert image is not None and image.sha256 == SHA


def test_credentials_never_show() -> None:
    image = parse("https://user:secret@h:8443/d.img", f"sha256:{SHA}")
    assert image is not None and image.shown == "https://h:8443/d.img"
    assert "secret" in image.url  # still used for the request


def test_without_a_checksum_only_when_the_operator_allows() -> None:
    with pytest.raises(ConfigError, match=r"^config\.image_checksum: an image by URL needs"):
        parse("https://h/d.img")
    image = parse("https://h/d.img", rules=UrlRules(("https",), checksum_required=False))
    assert image is not None and image.sha256 is None


@pytest.mark.parametrize(
    ("value", "checksum", "message"),
    [
        ("ftp://h/d.img", f"sha256:{SHA}", r"config\.image: ftp:// URLs are not accepted"),
        ("https://h:99999/d", f"sha256:{SHA}", r"config\.image: .*not a valid URL"),
        ("https://h/d#x", f"sha256:{SHA}", r"config\.image: .*#fragment"),
        ("https://h/d", "sha256:abc", r"config\.image_checksum: .*64 hex digits"),
        ("https://h/d", SHA, r"config\.image_checksum: .*sha256:<64 hex digits>"),
        ("https://h/d", "sha512:" + "a" * 128, r"config\.image_checksum: 'sha512'"),
        (f"https://h/d?checksum=md5:{'a' * 32}", "", r"config\.image \(\?checksum=\): 'md5'"),
    ],
)
def test_bad_values_name_the_option(value: str, checksum: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(value, checksum)
