"""`make run`: start vhostnet, boot a small guest on it, show the network working, stop.

The guest gets its address by DHCP, pings the gateway, resolves a name through
vhostnet's DNS forwarder and downloads a page from a web server on the host's
127.0.0.1 through the NAT. The host side (web server, DNS server) runs here,
in the private network namespace `make run` created, so nothing leaves the
machine. The guest's console is shown as it boots.
"""

from __future__ import annotations

import http.server
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from tools.guestkit import build_kit
from tools.qemu import QemuGuest

REPO = Path(__file__).resolve().parent.parent
HTTP_PORT = 8080
DNS_PORT = 5353
DEMO_NAME = "host.vhostnet.test"
PAGE = b"Hello from the host, through vhostnet's NAT!\n"

GUEST_SCRIPT = f"""
echo "--- guest: DHCP"
udhcpc -i eth0 -n -q -t 5 -T 2 2>&1 | tail -3
ip -4 addr show eth0 | grep inet
echo "--- guest: ping the gateway"
ping -c 3 10.0.2.2
echo "--- guest: resolve {DEMO_NAME}"
nslookup {DEMO_NAME} 2>&1 | tail -2
echo "--- guest: fetch http://{DEMO_NAME}:{HTTP_PORT}/"
wget -q -O - http://{DEMO_NAME}:{HTTP_PORT}/ && echo RESULT demo=ok
"""


class QuietHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: object) -> None:
        pass


def serve_dns(sock: socket.socket, stop: threading.Event) -> None:
    """Answer every A question with the gateway address (the host, seen from the guest)."""
    sock.settimeout(0.2)
    while not stop.is_set():
        try:
            query, peer = sock.recvfrom(512)
        except TimeoutError:
            continue
        if len(query) < 12:
            continue
        end = query.find(b"\x00", 12)
        if end < 0 or len(query) < end + 5:
            continue
        question = query[12:end + 5]
        header = query[:2] + b"\x81\x80" + b"\x00\x01\x00\x01\x00\x00\x00\x00"
        answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([10, 0, 2, 2])
        sock.sendto(header + question + answer, peer)


def main() -> int:
    if os.environ.get("VHOSTNET_NETNS") != "1":
        print("demo: run it with `make run` (it needs a private network namespace)", file=sys.stderr)
        return 2
    kit = build_kit()
    version = "10.0" if kit.qemu10 is not None else "7.2"
    workdir = Path(tempfile.mkdtemp(prefix="vhostnet-demo-"))
    socket_path = workdir / "vhostnet.sock"

    web = http.server.ThreadingHTTPServer(("127.0.0.1", HTTP_PORT), QuietHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    dns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dns.bind(("127.0.0.1", DNS_PORT))
    stop = threading.Event()
    threading.Thread(target=serve_dns, args=(dns, stop), daemon=True).start()

    print(f"demo: starting vhostnet on {socket_path}")
    vhostnet = subprocess.Popen(
        [sys.executable, "-m", "vhostnet", "-f", "--socket", str(socket_path),
         "--dns-upstream", f"127.0.0.1:{DNS_PORT}"],
        cwd=REPO,
    )
    ok = False
    try:
        deadline = time.monotonic() + 20
        while not socket_path.exists():
            if vhostnet.poll() is not None or time.monotonic() > deadline:
                print("demo: vhostnet did not start", file=sys.stderr)
                return 1
            time.sleep(0.05)
        print(f"demo: booting a guest under QEMU {version} (TCG, about 10-20 s)")
        guest = QemuGuest(kit, version, socket_path=socket_path, script=GUEST_SCRIPT)
        with guest:
            shown = 0
            deadline = time.monotonic() + 180
            while guest.running() and time.monotonic() < deadline:
                text = guest.output()
                if len(text) > shown:
                    sys.stdout.write(text[shown:])
                    sys.stdout.flush()
                    shown = len(text)
                time.sleep(0.2)
            text = guest.output()
            sys.stdout.write(text[shown:])
            ok = guest.results().get("demo") == "ok"
    finally:
        vhostnet.terminate()
        vhostnet.wait(timeout=10)
        web.shutdown()
        stop.set()
        dns.close()
    print("demo: the guest reached the host through vhostnet" if ok else "demo: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
