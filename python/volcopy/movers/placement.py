"""Placement: which mover runs a copy from one transport to another.

A mover fits when it is live (in the group), its transports include both src's and dst's, and it has a
free slot; the least loaded of those is chosen (the smallest share of its slots in use, then the fewest
copies, then the lowest rate, then its name, so that the choice is the same for everyone reading the
same group). When none fits, NoMoverFits names the transports needed and every mover seen with its
transports and slots, so that an operator sees at once whether a transport is missing or the movers
that have it are busy.

The choice is advisory: two callers reading the group at the same moment may both pick a mover with
one free slot. The mover's own claim of the job (the jobboard, docs/movers.md) is what bounds its
copies to its slots.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import NoMoverFits
from .membership import MoverInfo


def load(mover: MoverInfo, waiting: int = 0) -> tuple:
    in_use = mover.slots_in_use + waiting
    return (in_use / mover.slots, in_use, mover.rate, mover.name)


def describe(mover: MoverInfo) -> str:
    transports = ", ".join(mover.transports) or "no transport"
    full = ": full" if mover.free_slots == 0 else ""
    fences = "; fences" if mover.fences else ""
    return f"{mover.name} ({transports}{fences}; {mover.slots_in_use}/{mover.slots} slots{full})"


def choose(
    movers: Sequence[MoverInfo],
    src_transport: str,
    dst_transport: str,
    group: str,
    fences: bool = False,
    queue: bool = False,
    waiting: dict[str, int] | None = None,
) -> MoverInfo | None:
    """The mover to run a copy from ``src_transport`` to ``dst_transport``, or NoMoverFits. fences: the
    volume is attached, so the mover must have a compute to fence it with. queue: None rather than
    NoMoverFits when the movers that would fit are all full. waiting: jobs posted for each mover and not
    claimed yet, counted as slots in use (its published slots count only the jobs it runs)."""
    waiting = waiting or {}
    needed = (src_transport, dst_transport)
    reaching = [
        m
        for m in movers
        if src_transport in m.transports and dst_transport in m.transports and (m.fences or not fences)
    ]
    fitting = [m for m in reaching if m.free_slots > waiting.get(m.name, 0)]
    if fitting:
        return min(fitting, key=lambda m: load(m, waiting.get(m.name, 0)))
    if reaching and queue:
        return None
    both = src_transport if src_transport == dst_transport else f"{src_transport} and {dst_transport}"
    if fences:
        both += " with a compute to fence the attachments ([compute] in its configuration)"
    if not movers:
        seen = f"no mover is in group {group} (run `volcopy mover` on hosts that reach {both})"
    else:
        seen = f"movers seen in group {group}: " + ", ".join(describe(m) for m in movers)
    if reaching:
        why = f"every mover that reaches {both} is full"
    else:
        why = f"no live mover reaches {both}"
    raise NoMoverFits(
        f"no mover can copy from {src_transport} to {dst_transport}: {why}; {seen}", needed, list(movers)
    )
