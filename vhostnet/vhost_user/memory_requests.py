"""The memory requests of the back-end: SET_MEM_TABLE, GET_MAX_MEM_SLOTS, ADD_MEM_REG,
REM_MEM_REG, and the dirty log's SET_LOG_BASE and SET_LOG_FD (a part of ``BackendHandler``).

Region fds and the log fd are handed to the device, which owns and closes them.
"""

from __future__ import annotations

from vhostnet.vhost_user.codec import U64, LogParams, MemoryTable, Message, SingleMemoryRegion
from vhostnet.vhost_user.protocol import ProtocolFeature
from vhostnet.vhost_user.regions import AddResult, table_is_consistent
from vhostnet.vhost_user.request_state import Reject, RequestState, Result


class MemoryRequests(RequestState):
    """Guest memory regions and the dirty log."""


    def _set_mem_table(self, msg: Message, fds: list[int]) -> Result:
        table = MemoryTable.parse(msg.payload)
        if len(fds) != len(table.regions):
            raise Reject("missing_fd", f"{len(table.regions)} regions but {len(fds)} fds")
        if not table_is_consistent(table.regions):
            raise Reject("memory_overlap", "regions of the table overlap")
        # Regions present in both tables stay mapped; QEMU resends the table on every start.
        for old in self.regions:
            if old not in table.regions:
                self.regions.remove(old)
                self.device.region_removed(old)
        # Each fd stays in ``fds`` until the device takes it, so whatever fails
        # (this region or an earlier one), handle() closes every fd not taken.
        for region in table.regions:
            fd = fds.pop(0)
            if self.regions.check_add(region) is not AddResult.ADDED:
                self._close_fds([fd])
                continue
            self.device.region_added(region, fd)  # owns fd now, even when it raises
            self.regions.add(region)
        return None

    def _get_max_mem_slots(self, msg: Message, fds: list[int]) -> Result:
        return U64(self.max_mem_slots).emit()

    def _add_mem_reg(self, msg: Message, fds: list[int]) -> Result:
        region = SingleMemoryRegion.parse(msg.payload).region
        if len(fds) != 1:
            raise Reject("missing_fd", f"ADD_MEM_REG needs exactly one fd, got {len(fds)}")
        result = self.regions.check_add(region)
        if result is AddResult.OVERLAP:
            raise Reject("memory_overlap", f"region at gpa {region.guest_phys_addr:#x} overlaps")
        if result is AddResult.FULL:
            raise Reject("memory_full", f"all {self.max_mem_slots} memory slots used")
        fd = fds.pop()
        if result is AddResult.DUPLICATE:
            self._close_fds([fd])  # the region is already mapped
            return None
        self.device.region_added(region, fd)  # owns fd now, even when it raises
        self.regions.add(region)
        return None

    def _rem_mem_reg(self, msg: Message, fds: list[int]) -> Result:
        # The spec allows an fd here; it means nothing, close it quietly.
        self._close_fds(fds)
        region = SingleMemoryRegion.parse(msg.payload).region
        removed = self.regions.remove_matching(region)
        if removed is None:
            raise Reject("unknown_region", f"no region at gpa {region.guest_phys_addr:#x}")
        self.device.region_removed(removed)
        return None

    def _set_log_base(self, msg: Message, fds: list[int]) -> Result:
        if not self.has_protocol_feature(ProtocolFeature.LOG_SHMFD):
            raise Reject("unsupported_request", "LOG_SHMFD not negotiated")
        params = LogParams.parse(msg.payload)
        fd = self._take_one_fd(fds, "SET_LOG_BASE")
        self.device.set_log_base(fd, params.mmap_size, params.mmap_offset)
        # With LOG_SHMFD the front-end blocks for this reply, REPLY_ACK or not.
        return U64(0).emit()

    def _set_log_fd(self, msg: Message, fds: list[int]) -> Result:
        # An optional "log changed" eventfd; we log synchronously and need none.
        self._close_fds(fds)
        return None
