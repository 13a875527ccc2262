"""The owner's side of replication: the node that sends its folders to friends.

Scan a folder against the index, push what changed, restore a replica, verify it; the
client that connects to a friend's node with its key pinned.
"""
