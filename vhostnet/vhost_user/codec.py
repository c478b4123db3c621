"""Wire format of vhost-user messages: header, payload structures, framer.

Every payload structure is a small dataclass with ``parse(data)`` (the length is
checked once, before any field is read; anything short, long or inconsistent is
a ``CodecError``) and ``emit()`` (the exact bytes QEMU expects). The ``Framer``
turns a byte stream plus SCM_RIGHTS fds into whole ``Message`` objects without
doing any I/O itself.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Self

from vhostnet.vhost_user.protocol import (
    CONFIG_SPACE_MAX,
    HEADER_SIZE,
    NEED_REPLY,
    PAYLOAD_MAX_SIZE,
    REPLY,
    REPLY_FLAGS,
    VERSION,
    VERSION_MASK,
    VHOST_USER_MAX_FDS,
    VRING_INDEX_MASK,
    VRING_NOFD_MASK,
)

U64_MAX = (1 << 64) - 1


class CodecError(ValueError):
    """Bytes that do not form a valid vhost-user message or payload."""


def _expect_size(name: str, data: bytes, *sizes: int) -> None:
    if len(data) not in sizes:
        wanted = " or ".join(str(s) for s in sizes)
        raise CodecError(f"{name}: payload is {len(data)} bytes, expected {wanted}")


# --------------------------------------------------------------------------
# Header and message


_HEADER = struct.Struct("<III")


@dataclass(frozen=True, slots=True)
class Header:
    """The 12-byte header: u32 request, u32 flags, u32 payload size (little-endian)."""

    request: int
    flags: int
    size: int

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _expect_size("header", data, HEADER_SIZE)
        return cls(*_HEADER.unpack(data))

    def emit(self) -> bytes:
        return _HEADER.pack(self.request, self.flags, self.size)

    def check(self) -> None:
        """Reject headers that make the rest of the stream untrustworthy."""
        if self.flags & VERSION_MASK != VERSION:
            raise CodecError(f"header: unsupported version in flags {self.flags:#x}")
        if self.size > PAYLOAD_MAX_SIZE:
            raise CodecError(f"header: payload size {self.size} exceeds {PAYLOAD_MAX_SIZE}")


@dataclass(slots=True)
class Message:
    """One message: request id, header flags, raw payload, fds that came with it."""

    request: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & REPLY)

    def header(self) -> Header:
        return Header(int(self.request), self.flags, len(self.payload))

    def emit(self) -> bytes:
        """Header plus payload; the fds travel separately (SCM_RIGHTS)."""
        return self.header().emit() + self.payload


def reply(msg: Message, payload: bytes = b"", fds: list[int] | None = None) -> Message:
    """The reply to ``msg``: same request id, flags exactly VERSION|REPLY (0x5)."""
    return Message(msg.request, REPLY_FLAGS, payload, list(fds or []))


# --------------------------------------------------------------------------
# Payload structures


_U64 = struct.Struct("<Q")


@dataclass(frozen=True, slots=True)
class U64:
    """A single u64: features, status, MTU, reply-ack result, ring index + NOFD."""

    value: int

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _expect_size("u64", data, _U64.size)
        return cls(_U64.unpack(data)[0])

    def emit(self) -> bytes:
        return _U64.pack(self.value)

    # SET_VRING_KICK/CALL/ERR pack a ring index and a "no fd" bit into the u64.
    @property
    def vring_index(self) -> int:
        return self.value & VRING_INDEX_MASK

    @property
    def vring_nofd(self) -> bool:
        return bool(self.value & VRING_NOFD_MASK)


_VRING_STATE = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class VringState:
    """u32 index, u32 num (ring size, base index, or enable flag)."""

    index: int
    num: int

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _expect_size("vring state", data, _VRING_STATE.size)
        return cls(*_VRING_STATE.unpack(data))

    def emit(self) -> bytes:
        return _VRING_STATE.pack(self.index, self.num)


_VRING_ADDR = struct.Struct("<IIQQQQ")


@dataclass(frozen=True, slots=True)
class VringAddr:
    """Ring addresses; desc/used/avail are front-end virtual addresses."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log_guest_addr: int

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _expect_size("vring addr", data, _VRING_ADDR.size)
        return cls(*_VRING_ADDR.unpack(data))

    def emit(self) -> bytes:
        return _VRING_ADDR.pack(
            self.index, self.flags, self.desc, self.used, self.avail, self.log_guest_addr
        )


_REGION = struct.Struct("<QQQQ")


@dataclass(frozen=True, slots=True)
class MemoryRegion:
    """One guest memory region; the fd travels beside it, not inside it."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    SIZE = _REGION.size

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _expect_size("memory region", data, _REGION.size)
        region = cls(*_REGION.unpack(data))
        region.validate()
        return region

    def validate(self) -> None:
        if self.memory_size == 0:
            raise CodecError("memory region: size is zero")
        for name, start in (
            ("guest_phys_addr", self.guest_phys_addr),
            ("userspace_addr", self.userspace_addr),
            ("mmap_offset", self.mmap_offset),
        ):
            if start + self.memory_size - 1 > U64_MAX:
                raise CodecError(f"memory region: {name} + size wraps around 2**64")

    def emit(self) -> bytes:
        return _REGION.pack(
            self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset
        )

    def same_identity(self, other: MemoryRegion) -> bool:
        """REM_MEM_REG matches on gpa, uva and size; the mmap offset is ignored."""
        return (
            self.guest_phys_addr == other.guest_phys_addr
            and self.userspace_addr == other.userspace_addr
            and self.memory_size == other.memory_size
        )

    def overlaps_gpa(self, other: MemoryRegion) -> bool:
        return (
            self.guest_phys_addr < other.guest_phys_addr + other.memory_size
            and other.guest_phys_addr < self.guest_phys_addr + self.memory_size
        )

    def overlaps_uva(self, other: MemoryRegion) -> bool:
        return (
            self.userspace_addr < other.userspace_addr + other.memory_size
            and other.userspace_addr < self.userspace_addr + self.memory_size
        )


_TABLE_HEAD = struct.Struct("<II")
MAX_TABLE_REGIONS = VHOST_USER_MAX_FDS


@dataclass(frozen=True, slots=True)
class MemoryTable:
    """SET_MEM_TABLE: u32 nregions, u32 padding, then nregions regions."""

    regions: tuple[MemoryRegion, ...]

    @classmethod
    def parse(cls, data: bytes) -> Self:
        if len(data) < _TABLE_HEAD.size:
            raise CodecError(f"memory table: payload is {len(data)} bytes, need at least 8")
        nregions, _padding = _TABLE_HEAD.unpack_from(data)
        if nregions > MAX_TABLE_REGIONS:
            raise CodecError(f"memory table: {nregions} regions, at most {MAX_TABLE_REGIONS}")
        # QEMU sends exactly 8 + 32n bytes; older front-ends send the full
        # 8-slot structure with unused slots, which is just as unambiguous.
        exact = _TABLE_HEAD.size + nregions * _REGION.size
        full = _TABLE_HEAD.size + MAX_TABLE_REGIONS * _REGION.size
        _expect_size("memory table", data, *sorted({exact, full}))
        regions = []
        for i in range(nregions):
            start = _TABLE_HEAD.size + i * _REGION.size
            regions.append(MemoryRegion.parse(data[start : start + _REGION.size]))
        return cls(tuple(regions))

    def emit(self) -> bytes:
        if len(self.regions) > MAX_TABLE_REGIONS:
            raise CodecError(f"memory table: {len(self.regions)} regions, at most 8")
        return _TABLE_HEAD.pack(len(self.regions), 0) + b"".join(r.emit() for r in self.regions)


@dataclass(frozen=True, slots=True)
class SingleMemoryRegion:
    """ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region."""

    region: MemoryRegion

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _expect_size("single memory region", data, 8 + _REGION.size)
        return cls(MemoryRegion.parse(data[8:]))

    def emit(self) -> bytes:
        return bytes(8) + self.region.emit()


_LOG = struct.Struct("<QQ")


@dataclass(frozen=True, slots=True)
class LogParams:
    """SET_LOG_BASE: size and offset of the dirty bitmap inside the fd."""

    mmap_size: int
    mmap_offset: int

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _expect_size("log", data, _LOG.size)
        params = cls(*_LOG.unpack(data))
        if params.mmap_size == 0:
            raise CodecError("log: size is zero")
        if params.mmap_size + params.mmap_offset > U64_MAX:
            raise CodecError("log: offset + size wraps around 2**64")
        return params

    def emit(self) -> bytes:
        return _LOG.pack(self.mmap_size, self.mmap_offset)


# u64 iova, u64 size, u64 uaddr, u8 perm, u8 type, then padding to QEMU's sizeof (32).
_IOTLB = struct.Struct("<QQQBB6x")


@dataclass(frozen=True, slots=True)
class IotlbMsg:
    iova: int
    size: int
    uaddr: int
    perm: int
    type: int

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _expect_size("iotlb", data, _IOTLB.size)
        return cls(*_IOTLB.unpack(data))

    def emit(self) -> bytes:
        return _IOTLB.pack(self.iova, self.size, self.uaddr, self.perm, self.type)


_CONFIG_HEAD = struct.Struct("<III")


@dataclass(frozen=True, slots=True)
class Config:
    """GET/SET_CONFIG: u32 offset, u32 size, u32 flags, then size bytes."""

    offset: int
    flags: int
    payload: bytes

    @classmethod
    def parse(cls, data: bytes) -> Self:
        if len(data) < _CONFIG_HEAD.size:
            raise CodecError(f"config: payload is {len(data)} bytes, need at least 12")
        offset, size, flags = _CONFIG_HEAD.unpack_from(data)
        if size > CONFIG_SPACE_MAX:
            raise CodecError(f"config: size {size} exceeds {CONFIG_SPACE_MAX}")
        _expect_size("config", data, _CONFIG_HEAD.size + size)
        return cls(offset, flags, bytes(data[_CONFIG_HEAD.size :]))

    def emit(self) -> bytes:
        if len(self.payload) > CONFIG_SPACE_MAX:
            raise CodecError(f"config: size {len(self.payload)} exceeds {CONFIG_SPACE_MAX}")
        return _CONFIG_HEAD.pack(self.offset, len(self.payload), self.flags) + self.payload


_VRING_AREA = struct.Struct("<QQQ")


@dataclass(frozen=True, slots=True)
class VringArea:
    """Host notifier area: u64 (ring index | NOFD), u64 size, u64 offset."""

    index_flags: int
    size: int
    offset: int

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _expect_size("vring area", data, _VRING_AREA.size)
        return cls(*_VRING_AREA.unpack(data))

    def emit(self) -> bytes:
        return _VRING_AREA.pack(self.index_flags, self.size, self.offset)


_INFLIGHT = struct.Struct("<QQHH")


@dataclass(frozen=True, slots=True)
class Inflight:
    """GET/SET_INFLIGHT_FD. The fields take 20 bytes; QEMU's C struct pads to 24."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _expect_size("inflight", data, _INFLIGHT.size, _INFLIGHT.size + 4)
        return cls(*_INFLIGHT.unpack_from(data))

    def emit(self) -> bytes:
        return _INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)


_DEVICE_STATE = struct.Struct("<II")


@dataclass(frozen=True, slots=True)
class DeviceStateParams:
    """SET_DEVICE_STATE_FD: u32 direction (0 save, 1 load), u32 phase (0 stopped)."""

    direction: int
    phase: int

    @classmethod
    def parse(cls, data: bytes) -> Self:
        _expect_size("device state transfer", data, _DEVICE_STATE.size)
        return cls(*_DEVICE_STATE.unpack(data))

    def emit(self) -> bytes:
        return _DEVICE_STATE.pack(self.direction, self.phase)


# --------------------------------------------------------------------------
# Framer


class Framer:
    """Reassembles messages from a byte stream, sans-IO.

    Feed it what each recvmsg returned; fds are attached to the message that
    contains the first byte of the chunk they arrived with. That is only
    right if no read spans two messages: a UNIX stream recvmsg happily
    returns the bytes of earlier sendmsg calls followed by the one that
    carried fds. So read at most ``wanted()`` bytes at a time (the rest of the
    current header, or of the current message). A header that fails
    ``Header.check`` raises ``CodecError``: framing is lost and the caller
    must close the connection and the fds returned by ``take_fds()``.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        # Stream offset of _buffer[0], and pending (stream offset, fds) pairs.
        self._consumed = 0
        self._pending_fds: list[tuple[int, list[int]]] = []

    def feed(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            self._pending_fds.append((self._consumed + len(self._buffer), list(fds)))
        self._buffer += data

    def messages(self) -> Iterator[Message]:
        """Yield every complete message buffered so far."""
        while len(self._buffer) >= HEADER_SIZE:
            header = Header.parse(bytes(self._buffer[:HEADER_SIZE]))
            header.check()
            total = HEADER_SIZE + header.size
            if len(self._buffer) < total:
                return
            payload = bytes(self._buffer[HEADER_SIZE:total])
            del self._buffer[:total]
            end = self._consumed + total
            self._consumed = end
            yield Message(header.request, header.flags, payload, self._fds_before(end))

    def __iter__(self) -> Iterator[Message]:
        return self.messages()

    def wanted(self) -> int:
        """Bytes to read next so that the read stays inside the current message."""
        if len(self._buffer) < HEADER_SIZE:
            return HEADER_SIZE - len(self._buffer)
        header = Header.parse(bytes(self._buffer[:HEADER_SIZE]))
        header.check()
        return max(1, HEADER_SIZE + header.size - len(self._buffer))

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message waiting for more data."""
        return len(self._buffer)

    def take_fds(self) -> list[int]:
        """Fds not yet handed out with a message, for closing on error or EOF."""
        fds = [fd for _, chunk in self._pending_fds for fd in chunk]
        self._pending_fds.clear()
        return fds

    def _fds_before(self, end: int) -> list[int]:
        fds: list[int] = []
        while self._pending_fds and self._pending_fds[0][0] < end:
            fds.extend(self._pending_fds.pop(0)[1])
        return fds
