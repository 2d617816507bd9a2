"""What the handoff's state machine asks of a hypervisor, in its own words: images and disks, never a
QMP node name or a libvirt job. Two backends implement it: qemu.py (a QEMU the agent reaches over QMP)
and libvirt_backend.py (a domain libvirt owns, as on a Nova compute host).

A disk's chain is the list of image paths the guest reads through, top first: [src] before the fence,
[overlay, src] while fenced, [overlay, dst] once complete moved the overlay onto dst, [dst] at the end.
Every operation is idempotent or reads the chain first, so that a restarted agent can run it again, and
each one reports only what it read back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from .qmp import QemuError
from .state import Disk, VolumeMigration

# A hypervisor's failure, with its own words as the message (the QMP backend's errors are QemuError).
HypervisorError = QemuError

# Called with an event's name and data on a thread of the backend that must not wait for it. Names:
# "SHUTDOWN" (the guest is going away: the hypervisor says when it is gone), "STOPPED", "STARTED",
# "BLOCK_IO_ERROR" (data: {"nospace": bool}), "BLOCK_JOB" (data: {"disk", "status"}).
EventCallback = Callable[[str, dict], None]


class HypervisorNotRunning(HypervisorError):
    """The server's guest is not running."""


class Hypervisor(ABC):
    """One server (a guest) on this host, and the handoff's operations on its disks."""

    # How whether the guest runs is known, for messages: "the pid file /run/x.pid", "libvirt".
    liveness: str

    @abstractmethod
    def running(self) -> bool:
        """Whether the guest's QEMU runs, from the hypervisor (never from a connection error)."""

    @abstractmethod
    def identity(self) -> str | None:
        """Which run of the guest this is, or None when it does not run: a different identity means the
        guest was started again, from its own configuration, on the volumes that configuration names."""

    @abstractmethod
    def chain(self, disk: Disk) -> list[str]:
        """The disk's images, top first."""

    @abstractmethod
    def writable_and_shared(self, disk: Disk) -> tuple[bool, bool]:
        """(the guest may write the disk, another guest may write the same volume)."""

    @abstractmethod
    def prepare_fence(self, disk: Disk, m: VolumeMigration) -> None:
        """m.overlay_path made (0600), and whatever the fence needs, with the disk's chain untouched."""

    @abstractmethod
    def fence(self, disk: Disk, m: VolumeMigration) -> None:
        """Puts the overlay on top of the disk; from its return on, nothing writes to the volume below."""

    @abstractmethod
    def release_overlay(self, disk: Disk, m: VolumeMigration) -> None:
        """Lets go of an overlay that is out of the disk's chain (it may then be deleted); raises if the
        hypervisor still holds it."""

    @abstractmethod
    def merge_down(self, disk: Disk, m: VolumeMigration, before_switch: Callable[[], None]) -> None:
        """Merges the overlay on top into the image below it and moves the disk down onto that image.
        before_switch() is called once that image holds everything, just before the disk moves (what a
        stop of the hypervisor then leaves: switch_drains_disk): from then on the guest writes below, and
        the overlay must never be merged again. Picks up a merge a previous agent left running."""

    @abstractmethod
    def move_onto_dst(self, disk: Disk, m: VolumeMigration) -> str:
        """Puts the overlay's writes over dst (m.dst_path, m.dst_format) unless the chain shows it done;
        returns the path of the overlay the disk is then on, over dst. Raises, with the disk still on the
        overlay over src, if it cannot."""

    def prepare_move(self, disk: Disk, m: VolumeMigration) -> None:  # noqa: B027 - moves at complete
        """Starts moving the overlay's writes over dst ahead of complete, without waiting for it and
        without opening dst (it may still be written until move_onto_dst); move_onto_dst picks it up. A
        move under way is left alone. A backend that moves only at complete (QMP) does nothing."""

    def move_stopped(self, disk: Disk, m: VolumeMigration) -> str | None:
        """Why a move prepare_move started is no longer under way (move_onto_dst then starts it again),
        or None."""
        return None

    def abandon_move(self, disk: Disk, m: VolumeMigration) -> None:  # noqa: B027 - nothing was started
        """Stops a move prepare_move started without switching, and deletes what it made once the chain
        shows it is not in it; raises if it cannot."""

    @abstractmethod
    def dst_node(self, m: VolumeMigration) -> str:
        """What the backend calls dst in the new attachment's disk record (its Disk.node)."""

    @abstractmethod
    def release_src(self, disk: Disk, m: VolumeMigration) -> None:
        """After move_onto_dst: lets go of src (and of an overlay that is no longer on the chain); raises
        if the hypervisor still holds src."""

    # Whether the disk is drained when merge_down calls before_switch (QMP: the commit waits pending), so
    # that the volume below holds every write whether or not the switch then happens. Otherwise (libvirt's
    # pivot) the guest writes the overlay until the switch, and a hypervisor that stops during it leaves
    # it unknown which of the overlay and the volume is newer.
    switch_drains_disk = True

    # Whether move_read_only writes the disk's data onto dst (libvirt's block copy): dst must then hold
    # that data already, and no other guest may write dst yet.
    read_only_move_writes_dst = False

    @abstractmethod
    def move_read_only(self, disk: Disk, m: VolumeMigration) -> None:
        """A read-only disk (no overlay) moved onto dst, a raw volume."""

    @abstractmethod
    def bytes_written(self, disk: Disk, m: VolumeMigration) -> int:
        """Bytes of the disk the guest changed since the fence (in the overlay's granules)."""

    @abstractmethod
    def paused_on_enospc(self, disk: Disk) -> bool:
        """Whether the guest is paused because a write to this disk found no space."""

    @abstractmethod
    def resume_after_io_error(self) -> None:
        """Resumes a guest paused on a write error once its cause is gone; other pauses stay."""

    def repoint_stopped(self, disk: Disk, m: VolumeMigration, path: str, image_format: str) -> None:  # noqa: B027
        """A stopped guest's own configuration put on the image path alone (after an offline merge, or a
        complete while stopped), so that the guest starts on it with every write. A no-op where that
        configuration is not the hypervisor's to change (QMP: the operator's command line)."""

    def close(self) -> None:  # noqa: B027 - a backend without connections has nothing to close
        """Releases the backend's connections."""


__all__ = ["EventCallback", "Hypervisor", "HypervisorError", "HypervisorNotRunning"]
