"""Constants for the MyNAS integration."""

from datetime import timedelta
import logging
from typing import Final

DOMAIN: Final = "mynas"
LOGGER = logging.getLogger(__package__)

CONF_NODE_ID: Final = "node_id"
CONF_NODE_NAME: Final = "node_name"
CONF_STORAGE_ROOT: Final = "storage_root"
CONF_PORT: Final = "port"
CONF_ALLOW_SAME_DISK: Final = "allow_same_disk"

DEFAULT_PORT: Final = 8022

# Disk figures change slowly; a minute keeps the dashboard current at no cost.
DISK_SCAN_INTERVAL: Final = timedelta(minutes=1)
