"""The movers' defaults, apart from membership.py: the volcopy command builds its parser from them for
every command, and membership.py imports tooz (1 to 2 s, eventlet included)."""

DEFAULT_GROUP = "volcopy-movers"
DEFAULT_URL = "redis://127.0.0.1:6379"
COORDINATION_ENVIRONMENT = "VOLCOPY_COORDINATION_URL"  # the movers' tooz URL, for the volcopy command
