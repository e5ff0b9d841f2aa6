"""Who may associate, and what each association did (the access log, one row per operation and study).

Calling AEs come from ``scp_allow`` (``AE`` from any address, ``AE@host``
from that host only); with none configured only callers on loopback are
accepted, so a fresh install is not open to the hospital network. What an
association did is gathered in memory and written when it ends (released,
aborted, or rejected), so a busy C-STORE association costs no catalog write
per instance. Targets are UIDs or attribute names, never patient data.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from archive.errors import ConfigError
from archive.kinds import AccessAction
from archive.services.access import record_access
from archive.services.runtime import Archive

log = logging.getLogger(__name__)
AE_TITLE_MAX = 16  # PS3.5 AE value representation


@dataclass(frozen=True)
class AllowRule:
    """One ``scp_allow`` entry: an AE title, from any address or from the addresses of one host."""

    ae_title: str
    host: str | None = None
    addresses: frozenset[str] = frozenset()

    def admits(self, ae_title: str, address: str) -> bool:
        return ae_title == self.ae_title and (self.host is None or _normal(address) in self.addresses)


def parse_allow(entries: Iterable[str]) -> list[AllowRule]:
    """``AE`` or ``AE@host`` (a name is resolved now, to every address it has)."""
    rules = []
    for entry in entries:
        ae_title, sep, host = entry.partition("@")
        ae_title = ae_title.strip()
        if not ae_title or len(ae_title) > AE_TITLE_MAX or "\\" in ae_title:
            raise ConfigError(f"scp_allow: {entry!r} is not an AE title (1-16 characters) or AE@host")
        if not sep:
            rules.append(AllowRule(ae_title))
            continue
        host = host.strip()
        try:
            addresses = frozenset(_normal(str(info[4][0])) for info in socket.getaddrinfo(host, None))
        except socket.gaierror as exc:
            raise ConfigError(f"scp_allow: cannot resolve the host of {entry!r}: {exc}") from exc
        rules.append(AllowRule(ae_title, host, addresses))
    return rules


def _normal(address: str) -> str:
    """``::ffff:10.0.0.1`` and ``10.0.0.1`` are the same caller."""
    try:
        parsed = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address
    mapped = getattr(parsed, "ipv4_mapped", None)
    return str(mapped or parsed)


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(_normal(address)).is_loopback
    except ValueError:
        return False


def admitted(rules: list[AllowRule], ae_title: str, address: str) -> bool:
    """The allow-list's verdict; with no rules, loopback callers only."""
    if not rules:
        return is_loopback(address)
    return any(rule.admits(ae_title, address) for rule in rules)


@dataclass
class _Tally:
    nbytes: int = 0
    instances: int = 0
    status: int = 0  # the last failure status answered for this target (0: every operation succeeded)


@dataclass
class AssociationLog:
    """What one association did, by (action, target): written to the access log when it ends."""

    calling_ae: str
    address: str
    tallies: dict[tuple[AccessAction, str], _Tally] = field(default_factory=dict)
    rejected: bool = False  # refused at negotiation (the allow-list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def who(self) -> str:
        return f"dimse:{self.calling_ae}"

    def add(self, action: AccessAction, target: str, *, nbytes: int = 0, instances: int = 0, status: int = 0) -> None:
        with self.lock:
            tally = self.tallies.setdefault((action, target), _Tally())
            tally.nbytes += nbytes
            tally.instances += instances
            if status:
                tally.status = status

    def flush(self, archive: Archive, ending: str) -> None:
        """One row per (action, target), then the association's own row (``released``, ``aborted``...)."""
        with self.lock:
            tallies, self.tallies = self.tallies, {}
        try:
            total = 0
            for (action, target), tally in tallies.items():
                total += tally.instances
                record_access(archive, token_name=self.who, action=action, target=target, status=tally.status,
                              nbytes=tally.nbytes, instances=tally.instances, client=self.address)
            record_access(archive, token_name=self.who, action=AccessAction.ASSOCIATE, target=ending,
                          status=0, instances=total, client=self.address)
        except Exception:  # noqa: BLE001  (the audit must not take the server down; the log line keeps it)
            log.exception("could not record association of %s from %s (%s)", self.calling_ae, self.address, ending)
