"""Guest RAM as the back-end sees it: memfd regions mapped into this process.

QEMU describes guest memory as a table of regions. Each region has three
addresses for the same bytes:

* ``gpa``: the guest-physical address, used inside descriptors;
* ``uva``: QEMU's own virtual address, used for the ring addresses of
  SET_VRING_ADDR;
* ``mmap_offset``: where the region starts inside the fd QEMU passed.

We map ``mmap_offset + size`` bytes of the fd from offset 0 (mapping at the
offset would need page alignment we cannot promise for every front-end) and
keep a numpy ``uint8`` view of exactly the region's bytes.

Lifetime: the mapping is unmapped by CPython when the last reference to the
view goes away. A ``Virtqueue`` holds references to the views of the table it
was built from, so removing a region here never pulls memory out from under a
running queue; the queue drops the old views on ``Virtqueue.memory_changed()``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import stat
from dataclasses import dataclass

import numpy as np

__all__ = ["AddressError", "GuestMemory", "MappedRegion"]


class AddressError(ValueError):
    """An address range is not (entirely) inside one mapped region, or regions conflict."""


@dataclass(frozen=True, eq=False)
class MappedRegion:
    """One mapped region; ``data`` is a writable uint8 view of its ``size`` bytes."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int
    data: np.ndarray
    # False: the front-end may still shrink the file under the mapping; a copy that
    # then touches the lost pages takes SIGBUS, which the kernel's guard turns
    # into a broken queue (ext/virtq_guard.h).
    shrink_sealed: bool = False

    def same_layout(self, gpa: int, size: int, uva: int, mmap_offset: int) -> bool:
        return (self.gpa, self.size, self.uva, self.mmap_offset) == (gpa, size, uva, mmap_offset)


def _overlaps(start_a: int, size_a: int, start_b: int, size_b: int) -> bool:
    return start_a < start_b + size_b and start_b < start_a + size_a


_U64_LIMIT = 1 << 64


def _check_backing_file(fd: int, needed: int, gpa: int) -> bool:
    """Refuse a region its file cannot back; return whether the file is sealed against shrinking.

    Mapping past the end of a file succeeds, but touching those pages raises
    SIGBUS, so the file must already hold ``mmap_offset + size`` bytes.
    """
    try:
        info = os.fstat(fd)
    except OSError as error:
        raise AddressError(f"region at gpa {gpa:#x}: fd unusable ({error.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise AddressError(f"region at gpa {gpa:#x}: fd is not a memory file (memfd, shm or hugetlbfs)")
    if info.st_size < needed:
        raise AddressError(
            f"region at gpa {gpa:#x} needs {needed:#x} bytes of its file, which has {info.st_size:#x}"
        )
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False  # not a memfd (shm or hugetlbfs file): cannot be sealed
    return bool(seals & fcntl.F_SEAL_SHRINK)


class GuestMemory:
    """The table of mapped guest memory regions, with address translation."""

    def __init__(self) -> None:
        self._regions: list[MappedRegion] = []
        self._generation = 0

    @property
    def generation(self) -> int:
        """Increments on every change of the table; queues compare it to know when to rebuild."""
        return self._generation

    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        return tuple(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    def add_region(self, gpa: int, size: int, uva: int, mmap_offset: int, fd: int) -> None:
        """Map a region of ``fd``. The caller keeps ownership of ``fd`` (mmap holds its own dup).

        An identical duplicate is accepted and ignored (QEMU 7.2 re-sends regions once per
        queue pair); any other overlap in guest-physical or front-end address space raises
        ``AddressError``.
        """
        for value, name in ((gpa, "gpa"), (uva, "uva"), (mmap_offset, "mmap_offset")):
            if not 0 <= value < _U64_LIMIT:
                raise AddressError(f"region {name} {value:#x} is not a 64-bit address")
        if size <= 0:
            raise AddressError(f"region at gpa {gpa:#x} has size {size}")
        if gpa + size > _U64_LIMIT or uva + size > _U64_LIMIT:
            raise AddressError(f"region at gpa {gpa:#x} size {size:#x} wraps the address space")
        for region in self._regions:
            if region.same_layout(gpa, size, uva, mmap_offset):
                return
            if _overlaps(gpa, size, region.gpa, region.size) or _overlaps(
                uva, size, region.uva, region.size
            ):
                raise AddressError(
                    f"region gpa {gpa:#x} size {size:#x} uva {uva:#x} overlaps the mapped "
                    f"region gpa {region.gpa:#x} size {region.size:#x} uva {region.uva:#x}"
                )
        shrink_sealed = _check_backing_file(fd, mmap_offset + size, gpa)
        try:
            mapping = mmap.mmap(
                fd,
                mmap_offset + size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except (OSError, ValueError, OverflowError) as error:
            raise AddressError(
                f"cannot map region gpa {gpa:#x} size {size:#x} offset {mmap_offset:#x}: {error}"
            ) from error
        data = np.frombuffer(mapping, dtype=np.uint8, count=size, offset=mmap_offset)
        self._regions.append(MappedRegion(gpa, size, uva, mmap_offset, data, shrink_sealed))
        self._regions.sort(key=lambda region: region.gpa)
        self._generation += 1

    def remove_region(self, gpa: int, size: int, uva: int) -> bool:
        """Forget the region with exactly this gpa, size and uva; False if there is none."""
        for index, region in enumerate(self._regions):
            if (region.gpa, region.size, region.uva) == (gpa, size, uva):
                del self._regions[index]
                self._generation += 1
                return True
        return False

    def close(self) -> None:
        """Forget every region. Mappings still used by a queue stay until it lets go."""
        if self._regions:
            self._regions.clear()
            self._generation += 1

    def translate_gpa(self, gpa: int, length: int) -> tuple[int, int]:
        """``(region_index, offset)`` of a guest-physical range lying inside one region."""
        return self._translate(gpa, length, "gpa")

    def translate_uva(self, uva: int, length: int) -> tuple[int, int]:
        """``(region_index, offset)`` of a front-end virtual range lying inside one region."""
        return self._translate(uva, length, "uva")

    def gpa_view(self, gpa: int, length: int) -> np.ndarray:
        """A writable uint8 view of ``length`` guest bytes at ``gpa`` (one region)."""
        index, offset = self.translate_gpa(gpa, length)
        return self._regions[index].data[offset : offset + length]

    def uva_view(self, uva: int, length: int) -> np.ndarray:
        """A writable uint8 view of ``length`` bytes at front-end address ``uva`` (one region)."""
        index, offset = self.translate_uva(uva, length)
        return self._regions[index].data[offset : offset + length]

    def _translate(self, address: int, length: int, space: str) -> tuple[int, int]:
        if length < 0 or address < 0:
            raise AddressError(f"bad {space} range {address:#x}+{length}")
        for index, region in enumerate(self._regions):
            start = region.gpa if space == "gpa" else region.uva
            if start <= address and address + length <= start + region.size:
                return index, address - start
        raise AddressError(
            f"{space} range {address:#x}+{length:#x} is not inside one mapped region"
        )
