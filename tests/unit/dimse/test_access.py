"""The SCP's allow-list: AE titles, AE@host, and loopback only when none is configured."""

from __future__ import annotations

import pytest

from archive.dimse.access import admitted, parse_allow
from archive.errors import ConfigError


def test_no_rules_admit_loopback_callers_only() -> None:
    assert admitted([], "ANY", "127.0.0.1") and admitted([], "ANY", "::1") and admitted([], "X", "::ffff:127.0.0.5")
    assert not admitted([], "ANY", "10.0.4.21")


def test_ae_rules_and_host_rules() -> None:
    rules = parse_allow(["PACS1", "CT7@10.0.4.21", "LOCAL@localhost"])
    assert admitted(rules, "PACS1", "10.9.9.9")  # an AE alone: from anywhere
    assert admitted(rules, "CT7", "10.0.4.21") and admitted(rules, "CT7", "::ffff:10.0.4.21")
    assert not admitted(rules, "CT7", "10.0.4.22")  # the right AE from the wrong host
    assert admitted(rules, "LOCAL", "127.0.0.1")  # a host name is resolved
    assert not admitted(rules, "ct7", "10.0.4.21")  # AE titles are case-sensitive (PS3.5)
    assert not admitted(rules, "STRANGER", "127.0.0.1")  # with rules, loopback is not special


@pytest.mark.parametrize("entry", ["", "@10.0.0.1", "WAY_TOO_LONG_AE_TITLE", "CT@no-such-host.invalid"])
def test_bad_entries_are_configuration_errors(entry: str) -> None:
    with pytest.raises(ConfigError, match="scp_allow"):
        parse_allow([entry])
