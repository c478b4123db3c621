"""passt's command line, whole: every option of passt's man page against `python -m vhostnet`.

Each option is either accepted (vhostnet gets past the command line and stops only
at the socket, whose folder does not exist) or refused with exit 2 and exactly the
sentence of ``vhostnet.options.REFUSED``, which README's table follows too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemon import run_cli
from vhostnet import options
from vhostnet.cli import FD_RESERVE, flow_limit_for
from vhostnet.stack.config import ip4, ip6

# passt's man page (2026-07, reference section 4): option -> a value it takes, None
# for a switch. Short and long spellings are both run.
PASST_OPTIONS: dict[tuple[str, ...], str | None] = {
    ("-d", "--debug"): None, ("--trace",): None, ("--stats",): "5", ("-q", "--quiet"): None,
    ("-f", "--foreground"): None, ("-e", "--stderr"): None, ("-l", "--log-file"): "LOG",
    ("--log-size",): "65536", ("--runas",): "0:0", ("-c", "--conf-path"): "/tmp/conf",
    ("-p", "--pcap"): "/tmp/x.pcap", ("--pcap-size",): "1048576", ("-P", "--pid"): "PID",
    ("-m", "--mtu"): "65520", ("-a", "--address"): "10.0.2.20", ("-n", "--netmask"): "16",
    ("-M", "--mac-addr"): "9a:55:9a:55:9a:55", ("-g", "--gateway"): "10.0.2.1",
    ("-i", "--interface"): "lo", ("-o", "--outbound"): "127.0.0.1", ("--outbound-if4",): "lo",
    ("--outbound-if6",): "lo", ("-D", "--dns"): "192.0.2.53", ("--dns-forward",): "10.0.2.4",
    ("--dns-host",): "127.0.0.1", ("-S", "--search"): "example.org example.net",
    ("--no-dhcp-dns",): None, ("--dhcp-dns",): None, ("--no-dhcp-search",): None,
    ("--dhcp-search",): None, ("--no-tcp",): None, ("--no-udp",): None, ("--no-icmp",): None,
    ("--no-dhcp",): None, ("--no-ndp",): None, ("--no-dhcpv6",): None, ("--no-ra",): None,
    ("--freebind",): None, ("--map-host-loopback",): "10.0.2.9", ("--no-map-gw",): None,
    ("--map-guest-addr",): "10.0.2.8", ("-4", "--ipv4-only"): None, ("-6", "--ipv6-only"): None,
    ("-H", "--hostname"): "guest", ("--fqdn",): "guest.example.org",
    ("-t", "--tcp-ports"): "8080:80", ("-u", "--udp-ports"): "5353",
    ("-s", "--socket", "--socket-path"): "SOCKET", ("--vhost-user",): None,
    ("--repair-path",): "none", ("-1", "--one-off"): None,
}
# Run on their own below: they end vhostnet at once, or need an open socket.
SPECIAL = {("-h", "--help"), ("--version",), ("--print-capabilities",), ("-F", "--fd")}
# pasta's own options, which vhostnet (like passt) refuses.
PASTA_OPTIONS = ["--userns", "--netns", "--netns-only", "--no-netns-quit", "-I", "--ns-ifname",
                 "--ns-mac-addr", "--config-net", "--no-copy-routes", "--no-copy-addrs",
                 "--no-splice", "-T", "--tcp-ns", "-U", "--udp-ns", "--host-lo-to-ns-lo"]


def _cases() -> list[tuple[str, str | None]]:
    return [(name, value) for names, value in PASST_OPTIONS.items() for name in names]


@pytest.mark.parametrize(("option", "value"), _cases())
def test_every_passt_option_is_accepted_or_refused_as_the_table_says(
        option: str, value: str | None, tmp_path: Path) -> None:
    value = {"LOG": str(tmp_path / "log"), "PID": str(tmp_path / "pid"),
             "SOCKET": str(tmp_path / "no-such-dir" / "s")}.get(value or "", value)
    given = [option] if value is None else [option, value]
    socket_args = [] if option in ("-s", "--socket", "--socket-path") else [
        "--socket", str(tmp_path / "no-such-dir" / "s")]
    result = run_cli(*given, *socket_args)
    refused = options.refused_sentence(option)
    assert "Traceback" not in result.stderr
    if refused is not None:
        assert result.returncode == 2
        assert result.stderr.strip() == f"vhostnet: {refused}"
    else:
        # Accepted: the only complaint left is the socket's missing folder.
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().endswith("for the socket does not exist"), result.stderr


def test_the_refusals_are_only_pasta_options_and_conf_path() -> None:
    refused = {name for names in options.REFUSED for name in names}
    assert refused == set(PASTA_OPTIONS) | {"-c", "--conf-path"}
    for option in PASTA_OPTIONS:
        result = run_cli(option, *(["x"] if option in options.REFUSED_WITH_VALUE else []))
        assert result.returncode == 2
        assert result.stderr.strip() == f"vhostnet: {option} is a pasta option: vhostnet, " \
                                        "like passt, serves a guest, not a namespace"


def test_every_option_of_the_parser_is_listed_here() -> None:
    """A new option must join the table above (and README's)."""
    known = {name for names in [*PASST_OPTIONS, *SPECIAL] for name in names}
    own = {"--dns-upstream", "--tftp", "--bootfile", "--bootfile-ipxe", "--lease-time",
           "--flow-limit", "--queues", "--control", "--incoming", "--discard-tx",
           "--state-file", "--udp-idle-timeout", "--keep-cap-net-admin",
           "--max-guests", "--dhcp-range", "--dhcp-host", "--dns-domain"}
    refused = {name for names in options.REFUSED for name in names}
    parsed = {name for action in options.build_parser()._actions
              for name in action.option_strings}
    assert parsed == known | own | refused


def test_help_version_and_capabilities_as_passt() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("vhostnet ")
    result = run_cli("--print-capabilities")
    assert result.returncode == 0 and result.stdout == '{\n  "type": "net"\n}\n'
    result = run_cli("--help")
    assert result.returncode == 0
    assert "UDP and TCP over IPv6 are not translated yet" in " ".join(result.stdout.split())


def _config(*argv: str):
    args = options.build_parser().parse_args(["--socket", "/tmp/x.sock", "--dns-upstream",
                                              "127.0.0.1", *argv])
    config, _warnings = options.config_from_args(args, 20000, FD_RESERVE, flow_limit_for)
    return config


def test_one_address_per_family_keeps_both() -> None:
    config = _config("-a", "10.0.2.20/16", "-a", "fd00::20/64", "-g", "10.0.2.1", "-g", "fd00::1",
                     "-o", "127.0.0.1", "-o", "::1", "--dns-forward", "10.0.2.4",
                     "--dns-forward", "fd00::3", "--dns-host", "127.0.0.53", "--dns-host", "::1")
    assert config.guest_ipv4 == ip4("10.0.2.20") and config.netmask == ip4("255.255.0.0")
    assert config.gateway == ip4("10.0.2.1") and config.dns == ip4("10.0.2.4")
    assert config.outbound_ipv4 == ip4("127.0.0.1")
    assert config.dns_upstream[0] == ("127.0.0.53", 53)
    assert (config.guest_ipv6, config.prefix6_len, config.gateway6, config.outbound_ipv6,
            config.dns6) == (ip6("fd00::20"), 64, ip6("fd00::1"), ip6("::1"), ip6("fd00::3"))
    assert config.dns_upstream[:2] == [("127.0.0.53", 53), ("::1", 53)]


def test_a_second_address_of_one_family_is_one_sentence() -> None:
    with pytest.raises(options.UsageError, match="given twice for IPv4"):
        _config("-g", "10.0.2.1", "-g", "10.0.2.9")


def test_none_values_as_passt() -> None:
    config = _config("-D", "none", "-S", "none", "-m", "0", "-t", "none", "-u", "none")
    assert config.offered_dns == [] and config.search_domains == []
    assert not config.assign_mtu and config.mtu == 1500
    assert config.tcp_forwards == [] and config.udp_forwards == []
    config = _config("-D", "192.0.2.1", "-D", "192.0.2.2", "-D", "fd00::53", "-S", "a.org b.org")
    assert config.offered_dns == [ip4("192.0.2.1"), ip4("192.0.2.2")]
    assert config.offered_dns6 == [ip6("fd00::53")]
    assert config.search_domains == ["a.org", "b.org"]
    assert _config().offered_dns == [ip4("10.0.2.3")]  # the forwarder, as before
    assert _config("--no-map-gw").map_host_loopback is None
    assert _config("--map-guest-addr", "10.0.2.8").host_destination(ip4("10.0.2.8"), 80) == (
        "10.0.2.15", 80)


def test_port_specs_with_interface_and_all_fit_the_fd_limit() -> None:
    config = _config("-t", "%lo/8080", "-t", "all", "-u", "all")
    assert any(f.host_if == "lo" and f.host_port == 8080 for f in config.tcp_forwards)
    listeners = len(config.tcp_forwards) + len(config.udp_forwards)
    assert listeners + FD_RESERVE + config.flow_limit * 2 <= 20000
    assert {f.host_port for f in config.udp_forwards} >= {1, 2, 3}
    with pytest.raises(options.UsageError, match="no network interface"):
        _config("-t", "%no-such-if0/22")
    with pytest.raises(options.UsageError, match="not the guest's address"):
        _config("-t", "22:10.9.9.9/22")


def test_fit_forwards_keeps_named_ports_and_says_what_it_left_out() -> None:
    tcp = _config("-t", "all,~22", "-t", "22").tcp_forwards
    assert any(f.host_port == 22 and not f.optional for f in tcp)
    kept_tcp, _udp, warning = options.fit_forwards(tcp, [], 1000, FD_RESERVE)
    assert any(f.host_port == 22 for f in kept_tcp)
    assert len(kept_tcp) <= (1000 - FD_RESERVE) // 2 + 1
    assert warning is not None and "ulimit -Hn" in warning
