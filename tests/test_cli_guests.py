"""The options of several guests: --max-guests, --dhcp-range, --dhcp-host, --dns-domain."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemon import run_cli
from vhostnet import options
from vhostnet.cli import FD_RESERVE, flow_limit_for
from vhostnet.stack.config import ip4, ip6
from vhostnet.stack.leases import Reservation

MAC = bytes.fromhex("525400000001")


def _config(*argv: str):
    args = options.build_parser().parse_args(["--socket", "/tmp/x.sock", "--dns-upstream",
                                              "127.0.0.1", *argv])
    config, _warnings = options.config_from_args(args, 20000, FD_RESERVE, flow_limit_for)
    return config


def test_defaults_change_nothing() -> None:
    config = _config()
    assert (config.max_guests, config.dhcp_range, config.dhcp_hosts, config.dns_domain) == (
        1, None, [], "vhostnet.internal")
    assert not config.uses_lease_pool


def test_good_values_are_kept() -> None:
    config = _config("--max-guests", "4", "--dhcp-range", "10.0.2.100-10.0.2.150",
                     "--dhcp-host", "52:54:00:00:00:01,10.0.2.50,Web",
                     "--dhcp-host", "52:54:00:00:00:01,fec0::50", "--dns-domain", "Lab.Test.")
    assert config.max_guests == 4 and config.uses_lease_pool
    assert config.dhcp_range == (ip4("10.0.2.100"), ip4("10.0.2.150"))
    assert config.dhcp_hosts == [Reservation(MAC, ip4("10.0.2.50"), "web"),
                                 Reservation(MAC, ip6("fec0::50"))]
    assert config.dns_domain == "lab.test"
    assert _config("--dhcp-host", "52:54:00:00:00:01,10.0.2.50").uses_lease_pool


@pytest.mark.parametrize(("argv", "sentence"), [
    (["--max-guests", "0"], "--max-guests '0' is not a number of guests 1..64"),
    (["--max-guests", "65"], "--max-guests '65' is not a number of guests 1..64"),
    (["--max-guests", "two"], "--max-guests 'two' is not a number of guests 1..64"),
    (["--dhcp-range", "10.0.2.9-10.0.2.1"], "--dhcp-range '10.0.2.9-10.0.2.1' ends before it "
                                            "starts"),
    (["--dhcp-range", "10.0.3.1"], "--dhcp-range address 10.0.3.1 is outside the guest subnet"),
    (["--dhcp-range", "fec0::1"], "--dhcp-range 'fec0::1' is not FIRST[-LAST] of IPv4 "
                                  "addresses"),
    (["--dhcp-host", "52:54:00:00:00:01"], "--dhcp-host '52:54:00:00:00:01' is not "
                                           "MAC,ADDR[,NAME]"),
    (["--dhcp-host", "52:54:00:00:00:01,10.0.9.1"], "--dhcp-host address 10.0.9.1 is outside "
                                                    "the guests' subnet"),
    (["--dhcp-host", "52:54:00:00:00:01,10.0.2.2"], "--dhcp-host address 10.0.2.2 is one of "
                                                    "vhostnet's own addresses"),
    (["--dhcp-host", "52:54:00:00:00:01,10.0.2.50", "--dhcp-host",
      "52:54:00:00:00:02,10.0.2.50"], "--dhcp-host address 10.0.2.50 is reserved twice"),
    (["--dns-domain", "a..b"], "--dns-domain 'a..b' is not a domain name (labels of letters, "
                               "digits and '-', separated by dots)"),
])
def test_mistakes_are_one_sentence(argv: list[str], sentence: str) -> None:
    with pytest.raises(options.UsageError) as caught:
        _config(*argv)
    assert str(caught.value) == sentence


def test_the_command_line_exits_2_with_the_sentence(tmp_path: Path) -> None:
    socket_path = str(tmp_path / "no-such-dir" / "s")
    result = run_cli("--max-guests", "0", "--socket", socket_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == "vhostnet: --max-guests '0' is not a number of guests 1..64"
    result = run_cli("--max-guests", "8", "--dhcp-host", "52:54:00:00:00:01,10.0.2.50,db",
                     "--dns-domain", "lab.test", "--socket", socket_path)
    assert result.returncode == 2  # accepted: only the socket's folder is missing
    assert result.stderr.strip().endswith("for the socket does not exist"), result.stderr
