"""The back-end's view of the guest memory table (regions without their fds).

Pure bookkeeping for SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG: which regions
exist, which request is a harmless duplicate, which one would overlap. The
handler turns the answers into device calls.
"""

from __future__ import annotations

from enum import Enum

from vhostnet.vhost_user.codec import MemoryRegion


class AddResult(Enum):
    ADDED = "added"
    DUPLICATE = "duplicate"  # identical region already present: QEMU 7.2 + MQ does this
    OVERLAP = "overlap"
    FULL = "full"


class RegionTable:
    """An ordered set of non-overlapping memory regions."""

    def __init__(self, max_regions: int) -> None:
        self.max_regions = max_regions
        self._regions: list[MemoryRegion] = []

    def __iter__(self):
        return iter(list(self._regions))

    def __len__(self) -> int:
        return len(self._regions)

    def check_add(self, region: MemoryRegion) -> AddResult:
        """What ``add`` would do, without changing anything."""
        if region in self._regions:
            return AddResult.DUPLICATE
        for existing in self._regions:
            if existing.overlaps_gpa(region) or existing.overlaps_uva(region):
                return AddResult.OVERLAP
        if len(self._regions) >= self.max_regions:
            return AddResult.FULL
        return AddResult.ADDED

    def add(self, region: MemoryRegion) -> AddResult:
        result = self.check_add(region)
        if result is AddResult.ADDED:
            self._regions.append(region)
        return result

    def remove_matching(self, region: MemoryRegion) -> MemoryRegion | None:
        """Remove the region with the same gpa, uva and size; return it, or None."""
        for existing in self._regions:
            if existing.same_identity(region):
                self._regions.remove(existing)
                return existing
        return None

    def remove(self, region: MemoryRegion) -> None:
        self._regions.remove(region)

    def clear(self) -> list[MemoryRegion]:
        removed, self._regions = self._regions, []
        return removed


def table_is_consistent(regions: list[MemoryRegion] | tuple[MemoryRegion, ...]) -> bool:
    """True if no two regions of a SET_MEM_TABLE overlap in gpa or uva space."""
    for i, first in enumerate(regions):
        for second in regions[i + 1 :]:
            if first.overlaps_gpa(second) or first.overlaps_uva(second):
                return False
    return True
