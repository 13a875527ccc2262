"""The server's bounds: what one peer may make this node hold or open, and how often it tidies."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one peer can make this node hold in memory or open at once."""

    connections_per_peer: int = 4
    sessions_per_connection: int = 4
    unauthenticated_connections: int = 32
    # ...of which one address (an IPv6 /64) may hold: one host cannot lock everyone out.
    unauthenticated_per_address: int = 8
    login_timeout: float = 30.0
    hello_timeout: float = 30.0
    # A batch of small files goes to the disk at this many files or bytes...
    batch_files: int = 512
    batch_bytes: int = 4 * 1024 * 1024
    # ...or once it is this old, or the channel has been silent this long, when no whole
    # frame is waiting: a slow link still gets its acknowledgements every fraction of a
    # second, a fast one fills whole batches.
    batch_age: float = 0.2
    batch_idle: float = 0.05
    batches_in_flight: int = 2
    # An upload's chunks go to its file in groups of about this size (one thread hop each).
    upload_group: int = 1024 * 1024
    # Bytes of a peer's data held in memory (read, not yet on disk): per session, and for
    # all sessions of one peer together. Each must hold a batch and the largest frame.
    session_bytes: int = 16 * 1024 * 1024
    peer_bytes: int = 32 * 1024 * 1024
    # Failed logins from one address before each new attempt waits, doubling up to a cap.
    free_failures: int = 5
    max_delay: float = 30.0
    # Unknown keys one connection may offer before it is cut off (sshd's MaxAuthTries).
    auth_attempts: int = 6
    # Reachability checks (CHECK): one per peer this often (seconds), each address dialed
    # with this timeout.
    check_every: float = 60.0
    check_timeout: float = 5.0
    # Idle reverse channels (``protocol.REVERSE_SUBSYSTEM``) a peer may hold open here.
    reverse_slots_per_peer: int = 4
    # Usage is written to disk this often (seconds), and expired trash purged this often.
    persist_every: float = 60.0
    purge_every: float = 3600.0
