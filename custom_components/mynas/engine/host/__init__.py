"""The host's side of replication: the node that keeps friends' copies.

``server`` authenticates a peer by its pinned key and serves two subsystems: the
replication session (``session`` with ``session_upload``, ``session_reads`` and
``session_io``; ``budget`` and ``limits`` bound it) and read-only SFTP (``sftp``). Both
work in the peer's ``jail`` inside the ``space`` of all jails: the jail's path rules
(``paths``, ``jailfs``), its ``quota``, its ``trash``, batch ``writes`` and large
files received in ``upload``, on top of the blocking ``disk`` helpers.
"""
