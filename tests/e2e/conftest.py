"""Fixtures for tests that boot real guests.

Fixtures:
  kit            session: the guest kit (kernel, initramfs, QEMU 10.0 if any)
  qemu_version   "7.2" and "10.0" (10.0 skipped, with the reason, if it could not be had)
  e2e_tmp        a short temporary folder (UNIX socket paths must stay < 108 bytes)
  vhostnet       factory: vhostnet(*args, socket_path=None, wrapper=()) -> VhostnetProcess, started,
                 socket present; stopped at teardown; the test fails if it crashed
  guest          factory: guest(version, script, socket_path=None, **QemuGuest kwargs)
                 -> QemuGuest, started; killed at teardown
  run_guest      factory: run_guest(version, script, socket_path=None, timeout=180,
                 **kwargs) -> GuestRun, the guest booted, ran the script and powered off

On failure the vhostnet log and the guest console are attached to the report.
Every test here refuses to run outside the private network namespace of
`python3 -m tools.netns` (what `make test` uses).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.guestlib import GuestRun, VhostnetError, VhostnetProcess, script_exit_code
from tests.support.daemon import nobody_tmp_dir
from tools.guestkit import Kit, KitError, build_kit
from tools.netns import in_private_netns, interfaces
from tools.qemu import GuestError, QemuGuest

E2E_DIR = Path(__file__).resolve().parent
DEFAULT_GUEST_TIMEOUT = 180.0  # TCG boot is ~10 s; leave room for a loaded 2-core machine

LOG_SECTIONS = pytest.StashKey[list[tuple[str, Callable[[], str]]]]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if E2E_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for title, read in item.stash.get(LOG_SECTIONS, []):
            report.sections.append((title, _tail(read(), 80)))


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _attach_log(request: pytest.FixtureRequest, title: str, read: Callable[[], str]) -> None:
    request.node.stash.setdefault(LOG_SECTIONS, []).append((title, read))


@pytest.fixture(autouse=True)
def _require_private_netns() -> None:
    """Guests and servers must only ever see a loopback-only namespace."""
    if not in_private_netns():
        pytest.fail("end-to-end tests must run inside a private network namespace: use "
                    "`make test` (or `python3 -m tools.netns -- python3 -m pytest ...`)",
                    pytrace=False)
    found = interfaces()
    if found != ["lo"]:
        pytest.fail(f"the network namespace has interfaces {found}, expected only lo: "
                    "use `make test`", pytrace=False)


@pytest.fixture(scope="session")
def kit() -> Kit:
    try:
        return build_kit()
    except KitError as error:
        pytest.fail(f"the guest kit could not be built: {error}", pytrace=False)


@pytest.fixture(params=["7.2", "10.0"])
def qemu_version(request: pytest.FixtureRequest, kit: Kit) -> str:
    if request.param == "10.0" and kit.qemu10 is None:
        reason = f"QEMU 10.0 unavailable: {kit.qemu10_reason}"
        print(reason)
        pytest.skip(reason)
    return request.param


@pytest.fixture
def e2e_tmp() -> Iterator[Path]:
    """Where vhostnet's sockets go: a folder nobody (whom vhostnet, started as root,
    becomes) owns, so it removes its sockets at exit and makes its default SOCKET.repair."""
    with nobody_tmp_dir() as path:
        yield path


@pytest.fixture
def vhostnet(request: pytest.FixtureRequest, e2e_tmp: Path,
             tmp_path: Path) -> Iterator[Callable[..., VhostnetProcess]]:
    started: list[VhostnetProcess] = []
    failed_to_start: list[VhostnetProcess] = []

    def start(*args: str, socket_path: Path | None = None, timeout: float = 30.0,
              wrapper: tuple[str, ...] = ()) -> VhostnetProcess:
        index = len(started)
        process = VhostnetProcess(socket_path or e2e_tmp / f"vhost{index}.sock", args,
                                  tmp_path / f"vhostnet{index}.log", wrapper)
        started.append(process)
        _attach_log(request, f"vhostnet {index} log", process.log_text)
        try:
            return process.start(timeout)
        except VhostnetError as error:
            failed_to_start.append(process)  # reported here, not again at teardown
            pytest.fail(str(error), pytrace=False)

    yield start

    crashed = []
    for index, process in enumerate(started):
        if process.process is None or process in failed_to_start:
            process.stop()
            continue
        exited_by_itself = not process.running() and not process.expected_exit
        code = process.stop()
        if exited_by_itself or code not in (0, -15):
            crashed.append(f"vhostnet {index} exited with {code}:\n{process.log_tail()}")
    if crashed:
        pytest.fail("vhostnet crashed during the test\n" + "\n".join(crashed), pytrace=False)


@pytest.fixture
def guest(request: pytest.FixtureRequest, kit: Kit,
          tmp_path: Path) -> Iterator[Callable[..., QemuGuest]]:
    started: list[QemuGuest] = []

    def start(version: str, script: str | None, socket_path: Path | None = None,
              **kwargs: object) -> QemuGuest:
        index = len(started)
        kwargs.setdefault("serial_log", tmp_path / f"guest{index}-{version}.serial")
        machine = QemuGuest(kit, version, socket_path=socket_path, script=script,
                            **kwargs)  # type: ignore[arg-type]
        started.append(machine)
        _attach_log(request, f"guest {index} (QEMU {version}) console", machine.output)
        _attach_log(request, f"guest {index} (QEMU {version}) stderr", machine.qemu_stderr)
        return machine.start()

    yield start

    for machine in started:
        machine.kill()


@pytest.fixture
def run_guest(guest: Callable[..., QemuGuest]) -> Callable[..., GuestRun]:
    def run(version: str, script: str, socket_path: Path | None = None,
            timeout: float = DEFAULT_GUEST_TIMEOUT, **kwargs: object) -> GuestRun:
        machine = guest(version, script, socket_path, **kwargs)
        try:
            code = machine.wait_exit(timeout)
        except GuestError as error:
            pytest.fail(str(error), pytrace=False)
        output = machine.output()
        return GuestRun(results=machine.results(), output=output, qemu_exit_code=code,
                        script_exit_code=script_exit_code(output))

    return run
