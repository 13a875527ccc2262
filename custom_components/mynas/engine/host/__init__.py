"""The host's side of replication: the node that keeps friends' copies.

The SSH server that authenticates a peer by its pinned key, the replication session and the
read-only SFTP it serves, and the storage that confines each peer to its own jail.
"""
