"""Data movers: hosts that run copies for the Migrator, chosen by the transports they can attach.

- ``volcopy mover --config-file FILE`` (service.py): one per host; joins a tooz group with its
  transports, copy slots and bandwidth budget (membership.py), and heartbeats.
- Fleet (fleet.py): the live movers as a client sees them, and placement (placement.py): the least
  loaded live mover with a free slot whose transports include src's and dst's.
- ``volcopy movers list`` (commands.py).

docs/movers.md says what exists and what comes next.
"""
