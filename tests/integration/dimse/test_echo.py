"""C-ECHO from dcmtk's echoscu: the smallest proof that the SCP answers on the network."""

from __future__ import annotations

from tests.integration.dimse.conftest import Scp, dcmtk


def test_echoscu_is_answered(scp: Scp) -> None:
    done = dcmtk("echoscu", "-v", "-aet", "ECHOER", *scp.address())
    assert "Received Echo Response (Success)" in done.stdout + done.stderr
