"""Constants for the MyNAS integration."""

from datetime import timedelta
import logging
from typing import Final

DOMAIN: Final = "mynas"
LOGGER = logging.getLogger(__package__)


# The node (config entry data).
CONF_NODE_ID: Final = "node_id"
CONF_NODE_NAME: Final = "node_name"
CONF_STORAGE_ROOT: Final = "storage_root"
CONF_PORT: Final = "port"
CONF_ALLOW_SAME_DISK: Final = "allow_same_disk"
CONF_KEY_FILE: Final = "key_file"
CONF_NODE_PUBLIC_KEY: Final = "public_key"
CONF_RESTORE_KEY: Final = "restore_key"
# Set up from a previous node's recovery code (never stored: the key file is written).
CONF_RECOVERY_CODE: Final = "recovery_code"
# The user confirmed the recovery kit is kept outside the house (its issue is gone).
CONF_KIT_SAVED: Final = "recovery_kit_saved"

# Node options.
CONF_ADDRESSES: Final = "addresses"
CONF_OVERDUE_HOURS: Final = "overdue_hours"
CONF_UNREACHABLE_HOURS: Final = "unreachable_hours"
# Node-wide bandwidth limits in MB/s (0: none), shared by every sync and restore.
CONF_UPLOAD_LIMIT: Final = "upload_limit_mbps"
CONF_DOWNLOAD_LIMIT: Final = "download_limit_mbps"
CONF_UPNP: Final = "upnp"
CONF_INBOUND: Final = "inbound"
# Every folder × peer pair is verified (and repaired) once per this many days; 0: never.
CONF_VERIFY_DAYS: Final = "verify_days"
DEFAULT_VERIFY_DAYS: Final = 30
DEFAULT_UPNP: Final = True
# Hold a sync that would replace or delete more than this share (%) of a folder's files
# at a friend, until the user says to send it (0: never hold).
CONF_MASS_CHANGE: Final = "mass_change_percent"
DEFAULT_MASS_CHANGE: Final = 30
INBOUND_CHOICES: Final = ("auto", "yes", "no")

# Subentry types.
SUBENTRY_PEER: Final = "peer"
SUBENTRY_FOLDER: Final = "folder"

# A peer (subentry data).
CONF_INVITE: Final = "invite_code"
CONF_NAME: Final = "name"
CONF_JAIL: Final = "jail"
CONF_PUBLIC_KEY: Final = "public_key"
CONF_QUOTA_GB: Final = "quota_gb"
CONF_QUOTA: Final = "quota"

# A folder (subentry data).
CONF_PATH: Final = "path"
CONF_PEERS: Final = "peers"
CONF_SCHEDULE: Final = "schedule"
CONF_TIME: Final = "time"
CONF_HOURS: Final = "hours"
CONF_RETENTION_DAYS: Final = "retention_days"
CONF_BWLIMIT: Final = "bwlimit_mbps"
CONF_EXCLUDE: Final = "exclude"
# Back up after changes (the folder watched), at most once per this many minutes.
CONF_WATCH: Final = "watch"
CONF_WATCH_MINUTES: Final = "watch_minutes"
DEFAULT_WATCH_MINUTES: Final = 15
# Friends' copies are encrypted (names and contents); a folder set up before this existed
# has no such key and is plain until converted (its repair issue).
CONF_ENCRYPTED: Final = "encrypted"

SCHEDULE_DAILY: Final = "daily"
SCHEDULE_INTERVAL: Final = "interval"

DEFAULT_PORT: Final = 8022
DEFAULT_OVERDUE_HOURS: Final = 36
# A peer unheard of for this long gets a repair issue: a home link may be down for a day.
DEFAULT_UNREACHABLE_HOURS: Final = 72
DEFAULT_RETENTION_DAYS: Final = 30
DEFAULT_INTERVAL_HOURS: Final = 6
GB: Final = 1_000_000_000

# Disk figures change slowly; a minute keeps the dashboard current at no cost.
DISK_SCAN_INTERVAL: Final = timedelta(minutes=1)
# How often the scheduler looks for due syncs, and ages/overdue states are recomputed.
SCHEDULER_TICK: Final = timedelta(minutes=1)
# How often each peer is asked whether it is there (and how much of its space we use).
PEER_PROBE_INTERVAL: Final = timedelta(minutes=10)
# A peer whose disk has less free space than this (whatever its quota says) is "full".
PEER_DISK_FULL_BELOW: Final = 100_000_000
# A full quota whose trash is at least this share of what is used: a repair issue says so
# (on both sides), since only more space for a while helps before the trash empties.
TRASH_LARGE_SHARE: Final = 0.3
# A hosted peer counts as at its quota from this share of it used.
QUOTA_FULL_FROM: Final = 0.99
# How often a full jail's trash is walked again for that issue.
TRASH_CHECK_INTERVAL: Final = timedelta(minutes=10)
# "Last seen" moves on by a minute at least (a peer that syncs connects many times a second).
LAST_SEEN_RESOLUTION: Final = timedelta(minutes=1)
# Retries after a failed sync: 5 min, 10, 20... at most 6 h apart.
RETRY_FIRST: Final = timedelta(minutes=5)
RETRY_MAX: Final = timedelta(hours=6)
# No scheduled verify in the first minutes after the node starts (its syncs go first).
VERIFY_STARTUP_DELAY: Final = timedelta(minutes=10)
# A pair's first verify falls at a time of day of its own within this window (spread).
VERIFY_SPREAD: Final = timedelta(hours=24)

EVENT_SYNC_FINISHED: Final = "mynas_sync_finished"
EVENT_UNKNOWN_KEY: Final = "mynas_unknown_key"

SERVICE_SYNC: Final = "sync"
SERVICE_VERIFY: Final = "verify"
SERVICE_RESTORE: Final = "restore"
SERVICE_CHECK_REACHABILITY: Final = "check_reachability"
SERVICE_LIST_FOLDERS: Final = "list_folders"
