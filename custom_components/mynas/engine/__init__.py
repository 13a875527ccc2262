"""The MyNAS backup engine: plain asyncio and threads, usable without Home Assistant.

Nothing under this package may import ``homeassistant`` (a test enforces it): the same code
runs inside Home Assistant, on the command line, in the benchmark and in the demo.

This module is the engine's public API, what a host application (the Home Assistant layer)
imports, and the only thing it imports (a test enforces that too): a node to run on the
engine's own thread, the types its runs report, the checks a form needs, the storage root,
keys, invite codes and the errors to expect. The submodules are the engine's own.

Importing the package must stay cheap (the command line starts through it), so each name
is loaded from its module on first use (PEP 562); ``__all__`` lists them all.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .errors import (
        AuthRefused,
        BackupMissing,
        BackupSizeMismatch,
        HostKeyMismatch,
        HostRefused,
        InvalidInvite,
        KeyFileError,
        MassChangeHeld,
        MyNasError,
        PeerDiskFull,
        PeerUnreachable,
        QuotaExceeded,
        RestoreConflict,
        SourceMissing,
    )
    from .host.paths import validate_peer_name
    from .host.quota import JailUsage
    from .identity import (
        Identity,
        canonical_key,
        copy_key,
        fingerprint,
        install as install_identity,
        load as load_identity,
        load_or_create as load_or_create_identity,
    )
    from .invite import (
        MAX_ADDRESSES,
        MAX_NAME_LENGTH as MAX_NODE_NAME_LENGTH,
        Invite,
        decode as decode_invite,
        encode as encode_invite,
        format_address,
        parse_address,
    )
    from .loop_thread import EngineLoop
    from .node import FolderConfig, Inbound, PeerConfig, ProbeResult, Reachability
    from .owner.backup_area import NewBackup, StoredBackup
    from .owner.holdings import HeldFolder, Holdings
    from .owner.replica import ReplicaKindMismatch
    from .owner.run import (
        Phase,
        Progress,
        PushResult,
        VerifyResult,
        check_folder_name,
        check_subpath,
    )
    from .owner.sealed import SealedFileError
    from .recovery_code import (
        RecoveryCodeError,
        identity_from as identity_from_recovery_code,
        of as recovery_code_of,
    )
    from .storage_root import (
        DiskUsage,
        RootProblem,
        StorageRootError,
        check_new_root,
        check_root,
        claim_root,
        filesystem_identity,
        jails_on_disk,
        measure_root,
        names_on_disk,
        open_root,
    )
    from .threaded_node import ThreadedNode
    from .units import format_bytes

__all__ = [
    "MAX_ADDRESSES",
    "MAX_NODE_NAME_LENGTH",
    "AuthRefused",
    "BackupMissing",
    "BackupSizeMismatch",
    "DiskUsage",
    "EngineLoop",
    "FolderConfig",
    "HeldFolder",
    "Holdings",
    "HostKeyMismatch",
    "HostRefused",
    "Identity",
    "Inbound",
    "InvalidInvite",
    "Invite",
    "JailUsage",
    "KeyFileError",
    "MassChangeHeld",
    "MyNasError",
    "NewBackup",
    "PeerConfig",
    "PeerDiskFull",
    "PeerUnreachable",
    "Phase",
    "ProbeResult",
    "Progress",
    "PushResult",
    "QuotaExceeded",
    "Reachability",
    "RecoveryCodeError",
    "ReplicaKindMismatch",
    "RestoreConflict",
    "RootProblem",
    "SealedFileError",
    "SourceMissing",
    "StorageRootError",
    "StoredBackup",
    "ThreadedNode",
    "VerifyResult",
    "canonical_key",
    "check_folder_name",
    "check_new_root",
    "check_root",
    "check_subpath",
    "claim_root",
    "copy_key",
    "decode_invite",
    "encode_invite",
    "filesystem_identity",
    "fingerprint",
    "format_address",
    "format_bytes",
    "identity_from_recovery_code",
    "install_identity",
    "jails_on_disk",
    "load_identity",
    "load_or_create_identity",
    "measure_root",
    "names_on_disk",
    "open_root",
    "parse_address",
    "recovery_code_of",
    "validate_peer_name",
]

# Where each public name lives: "module" (same name there) or "module:name there".
_SOURCES = {
    # Running a node on the engine's thread, and what describes it.
    "ThreadedNode": "threaded_node",
    "EngineLoop": "loop_thread",
    "PeerConfig": "node",
    "FolderConfig": "node",
    "ProbeResult": "node",
    "Inbound": "node",
    "Reachability": "node",
    # What runs report.
    "Phase": "owner.run",
    "Progress": "owner.run",
    "PushResult": "owner.run",
    "VerifyResult": "owner.run",
    "JailUsage": "host.quota",
    # Home Assistant's own backups kept at a peer (its backup area).
    "NewBackup": "owner.backup_area",
    "StoredBackup": "owner.backup_area",
    "SealedFileError": "owner.sealed",
    # What our space at a peer holds (a node rebuilt from its key lists it too).
    "Holdings": "owner.holdings",
    "HeldFolder": "owner.holdings",
    # Names a form or a service call must check.
    "check_folder_name": "owner.run",
    "check_subpath": "owner.run",
    "validate_peer_name": "host.paths",
    # The storage root (blocking: call these from a worker thread).
    "DiskUsage": "storage_root",
    "RootProblem": "storage_root",
    "StorageRootError": "storage_root",
    "check_new_root": "storage_root",
    "check_root": "storage_root",
    "claim_root": "storage_root",
    "filesystem_identity": "storage_root",
    "jails_on_disk": "storage_root",
    "measure_root": "storage_root",
    "names_on_disk": "storage_root",
    "open_root": "storage_root",
    # Keys (loading and copying block too).
    "Identity": "identity",
    "canonical_key": "identity",
    "copy_key": "identity",
    "fingerprint": "identity",
    "load_identity": "identity:load",
    "load_or_create_identity": "identity:load_or_create",
    "install_identity": "identity:install",
    # The recovery code: the node secret for people (as secret as the key; never log it).
    "recovery_code_of": "recovery_code:of",
    "identity_from_recovery_code": "recovery_code:identity_from",
    "RecoveryCodeError": "recovery_code",
    # Invite codes and the addresses in them.
    "Invite": "invite",
    "MAX_ADDRESSES": "invite",
    "MAX_NODE_NAME_LENGTH": "invite:MAX_NAME_LENGTH",
    "decode_invite": "invite:decode",
    "encode_invite": "invite:encode",
    "format_address": "invite",
    "parse_address": "invite",
    # Errors, and the one unit a message needs.
    "MyNasError": "errors",
    "AuthRefused": "errors",
    "HostKeyMismatch": "errors",
    "HostRefused": "errors",
    "InvalidInvite": "errors",
    "KeyFileError": "errors",
    "MassChangeHeld": "errors",
    "PeerDiskFull": "errors",
    "PeerUnreachable": "errors",
    "BackupMissing": "errors",
    "BackupSizeMismatch": "errors",
    "QuotaExceeded": "errors",
    "RestoreConflict": "errors",
    "ReplicaKindMismatch": "owner.replica",
    "SourceMissing": "errors",
    "format_bytes": "units",
}

if not TYPE_CHECKING:  # mypy reads the imports above; a __getattr__ would hide typos

    def __getattr__(name: str) -> Any:
        """Load a public name from its module on first use (then it is a plain attribute)."""
        source = _SOURCES.get(name)
        if source is None:
            # Also how ``from . import invite`` finds a submodule: the import system then loads it.
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        module, _, attribute = source.partition(":")
        value = getattr(import_module(f"{__name__}.{module}"), attribute or name)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        """The public names, and whatever is already loaded."""
        return sorted({*globals(), *__all__})
