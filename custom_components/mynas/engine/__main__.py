"""The engine's command line: ``python -m custom_components.mynas.engine COMMAND ...``.

Runs the same code as Home Assistant does, without it: make a key, print an invite code
or the recovery code, serve friends' replicas, push a folder (encrypted unless ``--plain``),
restore it (with the key, or with the recovery code alone), verify it. Failures print one
line on stderr and exit non-zero; push, restore and verify end stdout with a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Sequence
import contextlib
import json
import logging
import os
from pathlib import Path
import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from . import identity as identity_mod, invite as invite_mod
from .errors import MassChangeHeld, MyNasError
from .owner.run import PeerTarget, Progress
from .units import format_bytes, parse_size

if TYPE_CHECKING:
    from .owner.index import Index
    from .owner.run import PushResult, RestoreResult, VerifyResult

# Each command imports what it runs, when it runs (``push``: the index, the scan and the
# sealing; the SSH client only once something is to be sent): a push with nothing to send
# is mostly start-up, and asyncssh alone would double it.


async def push(*args: Any, **kwargs: Any) -> PushResult:
    """``owner.push.push``, imported on first use."""
    from .owner.push import push as run  # noqa: PLC0415

    return await run(*args, **kwargs)


async def restore(*args: Any, **kwargs: Any) -> RestoreResult:
    """``owner.restore.restore``, imported on first use."""
    from .owner.restore import restore as run  # noqa: PLC0415

    return await run(*args, **kwargs)


async def verify(*args: Any, **kwargs: Any) -> VerifyResult:
    """``owner.verify.verify``, imported on first use."""
    from .owner.verify import verify as run  # noqa: PLC0415

    return await run(*args, **kwargs)


_LOGGER = logging.getLogger("mynas")


class CommandError(Exception):
    """A problem with what was asked; printed as one line, exit status 1."""


def _address(text: str) -> str:
    try:
        host, port = invite_mod.parse_address(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return invite_mod.format_address(host, port)


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        days = 0
    if days < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of days, at least 1")
    return days


def _percent(text: str) -> int:
    try:
        percent = int(text)
    except ValueError:
        percent = 0
    if not 1 <= percent <= 100:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole percentage, 1 to 100")
    return percent


_PROG = "python -m custom_components.mynas.engine"


class _Parser(argparse.ArgumentParser):
    """Reports a bad argument as one line on stderr, like every other failure (status 2)."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(_PROG).strip()
        self.exit(2, f"mynas{' ' + command if command else ''}: error: {message} (see --help)\n")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _peer_grant(text: str) -> tuple[str, str, int]:
    """Parse ``NAME=PUBKEY_FILE:QUOTA``."""
    name, sep, rest = text.partition("=")
    key_file, sep2, quota = rest.rpartition(":")
    if not sep or not sep2 or not name or not key_file:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected NAME=PUBKEY_FILE:QUOTA, e.g. bob=bob.pub:20G"
        )
    from .host.paths import validate_peer_name  # noqa: PLC0415 - serve only (see cmd_serve)

    try:
        validate_peer_name(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None
    return name, key_file, _size(quota)


def build_parser() -> argparse.ArgumentParser:
    """Return the command-line parser."""
    parser = _Parser(
        prog=_PROG,
        description="MyNAS engine: friend-to-friend backups over SSH.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keygen = commands.add_parser(
        "keygen", help="create this node's key (if absent), print its public key"
    )
    keygen.add_argument("--key", required=True, help="private key file (created with mode 0600)")

    code = commands.add_parser(
        "recovery-code",
        help="print the node secret as a recovery code (keep it outside the house)",
    )
    code.add_argument(
        "--key", required=True, help="this node's private key file (keygen creates it)"
    )

    invite = commands.add_parser("invite", help="print this node's invite code")
    invite.add_argument(
        "--key", required=True, help="this node's private key file (keygen creates it)"
    )
    invite.add_argument("--name", required=True, help="this node's name, as friends will see it")
    invite.add_argument(
        "--address",
        required=True,
        action="append",
        type=_address,
        metavar="HOST:PORT",
        help="where friends reach this node (repeatable: tried in the order given)",
    )

    serve = commands.add_parser("serve", help="host friends' replicas until SIGINT/SIGTERM")
    serve.add_argument(
        "--key", required=True, help="this node's private key file (keygen creates it)"
    )
    serve.add_argument(
        "--storage", required=True, help="storage root; each peer's jail is STORAGE/NAME/"
    )
    serve.add_argument(
        "--listen",
        required=True,
        type=_address,
        metavar="HOST:PORT",
        help="address to listen on, e.g. 0.0.0.0:8022",
    )
    serve.add_argument(
        "--peer",
        action="append",
        default=[],
        type=_peer_grant,
        metavar="NAME=PUBKEY_FILE:QUOTA",
        help="a friend allowed in, e.g. alice=alice.pub:500G (repeatable)",
    )
    serve.add_argument(
        "--trash-days",
        type=_days,
        default=30,
        metavar="N",
        help="days replaced and deleted files stay in the trash (default: 30)",
    )

    for name, text in (
        ("push", "send a folder's changes to a peer (nothing changed: no connection)"),
        ("restore", "copy a folder (or a path in it) back from a peer"),
        ("verify", "compare a peer's copy with the folder, without downloading"),
        ("folders", "list the folders a peer keeps for this node (after a fire, too)"),
    ):
        sub = commands.add_parser(name, help=text)
        if name in ("restore", "folders"):
            secret = sub.add_mutually_exclusive_group(required=True)
            secret.add_argument("--key", help="this node's private key file (keygen creates it)")
            secret.add_argument(
                "--recovery-code",
                metavar="CODE",
                help="the node's recovery code instead of its key file ('-': read it from stdin)",
            )
        else:
            sub.add_argument(
                "--key", required=True, help="this node's private key file (keygen creates it)"
            )
        sub.add_argument(
            "--peer",
            required=True,
            action="append",
            type=_address,
            metavar="HOST:PORT",
            help="the peer's address; several are tried in the order given",
        )
        sub.add_argument(
            "--peer-key",
            required=True,
            metavar="PUBKEY_FILE",
            help="the peer's public key (what its keygen printed), pinned",
        )
        if name == "folders":
            continue
        sub.add_argument("--folder", required=True, help="the folder's name on the peer")
        if name == "restore":
            sub.add_argument(
                "--to", required=True, metavar="DIR", help="where the files are written"
            )
            sub.add_argument(
                "--path",
                default="",
                metavar="SUBPATH",
                help="only this file or folder of the folder (default: everything)",
            )
            sub.add_argument("--overwrite", action="store_true", help="replace existing files")
        else:
            sub.add_argument("--source", required=True, metavar="DIR", help="the local folder")
            sub.add_argument(
                "--index", metavar="FILE", help="SQLite index (default: next to the key)"
            )
            sub.add_argument(
                "--exclude",
                action="append",
                default=[],
                metavar="PATTERN",
                help="leave out what matches, e.g. '*.tmp', 'cache/', 'Photos/raw/*' (repeatable)",
            )
        if name == "push":
            sub.add_argument(
                "--bwlimit", type=_size, metavar="RATE", help="bytes per second, e.g. 5M"
            )
            sub.add_argument(
                "--allow-empty",
                action="store_true",
                help="push an empty folder even if the peer holds files of it (deletes them)",
            )
            sub.add_argument(
                "--hold-over",
                type=_percent,
                metavar="PCT",
                help=(
                    "send nothing if the push would replace or delete more than PCT %% of "
                    "the peer's files of the folder (ransomware, a library moved by mistake;"
                    " Home Assistant holds at 30 %%); default: never held"
                ),
            )
            sub.add_argument(
                "--plain",
                action="store_true",
                help="keep a readable mirror on the peer instead of an encrypted copy",
            )
        if name == "verify":
            sub.add_argument("--repair", action="store_true", help="send what is missing or wrong")
    return parser


def _load_identity(path: str) -> identity_mod.Identity:
    return identity_mod.load(path)


def _target(args: argparse.Namespace) -> PeerTarget:
    line = identity_mod.load_public_line(args.peer_key)
    addresses = tuple(dict.fromkeys(args.peer))
    return PeerTarget(id=identity_mod.fingerprint(line), addresses=addresses, public_key=line)


def _index(args: argparse.Namespace) -> Index:
    from .owner.index import Index  # noqa: PLC0415 - push and verify only

    return Index(_index_path(args))


def _index_path(args: argparse.Namespace) -> Path:
    return (
        Path(args.index) if args.index else Path(args.key).resolve().parent / "mynas-index.sqlite"
    )


def _progress_printer() -> Callable[[Progress], None]:
    interactive = sys.stderr.isatty()

    def show(state: Progress) -> None:
        if not interactive:
            return
        percent = state.percent
        done = f"{state.files_done}/{state.files_total} files, {format_bytes(state.bytes_done)}"
        tail = f" ({percent:.0f} %)" if percent is not None else ""
        print(f"\r{state.phase}: {done}{tail}   ", end="", file=sys.stderr, flush=True)

    return show


def cmd_keygen(args: argparse.Namespace) -> int:
    """Create the key if absent; print the public key line."""
    node, _ = identity_mod.load_or_create(args.key)
    print(node.public_line)
    return 0


def cmd_recovery_code(args: argparse.Namespace) -> int:
    """Print the node secret as a recovery code: one line."""
    from . import recovery_code  # noqa: PLC0415 - this command only

    print(recovery_code.encode(identity_mod.private_seed(_load_identity(args.key))))
    return 0


def _restore_identity(args: argparse.Namespace) -> identity_mod.Identity:
    """The node to restore as: its key file, or the node rebuilt from its recovery code."""
    if args.key is not None:
        return _load_identity(args.key)
    from . import recovery_code  # noqa: PLC0415 - restore from a code only

    code = sys.stdin.readline() if args.recovery_code == "-" else args.recovery_code
    return identity_mod.from_seed(recovery_code.decode(code))


def cmd_invite(args: argparse.Namespace) -> int:
    """Print this node's invite code."""
    node = _load_identity(args.key)
    try:
        code = invite_mod.encode(
            invite_mod.Invite(args.name, tuple(args.address), node.public_line)
        )
    except ValueError as err:
        raise CommandError(str(err)) from None
    print(code)
    return 0


def _check_storage(storage: Path) -> None:
    if not storage.is_dir():
        raise CommandError(f"storage dir {storage} does not exist or is not a directory")
    if not os.access(storage, os.W_OK | os.X_OK):
        raise CommandError(f"storage dir {storage} is not writable")


async def cmd_serve(args: argparse.Namespace) -> int:
    """Host the peers' jails until SIGINT or SIGTERM."""
    # Imported here: the other commands (push above all) need neither the server nor the
    # host's storage, and their import is time a push with nothing to send would wait for.
    from .host.server import NodeServer, PeerGrant  # noqa: PLC0415
    from .host.space import HostedSpace  # noqa: PLC0415

    node = _load_identity(args.key)
    storage = Path(args.storage)
    _check_storage(storage)
    grants = []
    for name, key_file, quota in args.peer:
        key = identity_mod.load_public_key_file(key_file)
        grants.append(PeerGrant(name, identity_mod.public_key_line(key), quota))
    if len({grant.name for grant in grants}) != len(grants):
        raise CommandError("each --peer needs its own NAME")
    try:
        space = HostedSpace(storage, trash_days=args.trash_days)
    except (OSError, ValueError) as err:
        raise CommandError(f"storage dir {storage} is unusable: {err}") from None
    server = NodeServer(node, space, grants, on_event=_log_event)
    host, port = invite_mod.parse_address(args.listen)
    try:
        await server.start(host, port)
    except OSError as err:
        await server.close()
        raise CommandError(f"cannot listen on {args.listen}: {err.strerror or err}") from None
    _LOGGER.info("Serving %d peer(s) on %s (key %s)", len(grants), args.listen, node.fingerprint)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        _LOGGER.info("Stopping")
        await server.close()
    return 0


def _log_event(kind: str, data: dict[str, Any]) -> None:
    """What ``serve`` tells about its peers: where they say they are, where they come from."""
    if kind == "addresses_announced":
        _LOGGER.info(
            "%s can be reached at %s (learned: it announced them)",
            data["peer"],
            ", ".join(data["addresses"]) or "(nowhere)",
        )
    elif kind == "peer_connected":
        _LOGGER.info("%s connected from %s", data["peer"], data["address"])


def _summary(result: dict[str, Any]) -> None:
    if sys.stderr.isatty():
        print(file=sys.stderr)
    print(json.dumps(result, sort_keys=True))


async def _folder_run[T](
    args: argparse.Namespace, run: Callable[..., Awaitable[T]], **options: Any
) -> T:
    """Run ``run`` (push or verify) on the folder, source and index the arguments name."""
    node = _load_identity(args.key)
    target = _target(args)
    with _index(args) as index:
        return await run(
            node,
            target,
            args.folder,
            args.source,
            index,
            exclude=args.exclude,
            progress=_progress_printer(),
            **options,
        )


async def cmd_push(args: argparse.Namespace) -> int:
    """Push a folder; print the JSON summary."""
    try:
        result = await _folder_run(
            args,
            push,
            bwlimit=args.bwlimit,
            allow_empty=args.allow_empty,
            # A run with nothing to send leaves the peer alone ("peer_contacted": false).
            connect_if_unchanged=False,
            encrypted=not args.plain,
            hold_over=args.hold_over,
        )
    except MassChangeHeld as err:
        raise CommandError(f"{err} (push without --hold-over to send it)") from None
    for message in result.errors:
        print(f"warning: {message}", file=sys.stderr)
    _summary(result.as_dict())
    return 0


async def cmd_restore(args: argparse.Namespace) -> int:
    """Restore a folder or a path in it; print the JSON summary (status 1 if files failed)."""
    node = _restore_identity(args)
    result = await restore(
        node,
        _target(args),
        args.folder,
        args.to,
        path=args.path,
        overwrite=args.overwrite,
        progress=_progress_printer(),
    )
    for failure in result.failures:
        print(f"not restored: {failure}", file=sys.stderr)
    _summary(result.as_dict())
    return 1 if result.failed else 0


async def cmd_verify(args: argparse.Namespace) -> int:
    """Verify (and optionally repair) a replica; print the JSON summary."""
    result = await _folder_run(args, verify, repair=args.repair)
    for example in result.examples:
        print(example, file=sys.stderr)
    _summary(result.as_dict())
    return 0 if result.clean or result.repair_complete else 1


async def cmd_folders(args: argparse.Namespace) -> int:
    """Print, as JSON, the folders the peer keeps for us (names read back with our key)."""
    from .owner.holdings import holdings  # noqa: PLC0415 - this command only

    _summary((await holdings(_restore_identity(args), _target(args))).as_dict())
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "keygen": cmd_keygen,
    "invite": cmd_invite,
    "recovery-code": cmd_recovery_code,
    "serve": cmd_serve,
    "push": cmd_push,
    "restore": cmd_restore,
    "verify": cmd_verify,
    "folders": cmd_folders,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("asyncssh").setLevel(logging.WARNING)
    command = _COMMANDS[args.command]
    try:
        outcome = command(args)
        if asyncio.iscoroutine(outcome):
            outcome = asyncio.run(outcome)
    except (CommandError, MyNasError, ValueError, OSError) as err:
        print(f"mynas {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        with contextlib.suppress(Exception):
            print(file=sys.stderr)
        return 130
    return int(outcome)


if __name__ == "__main__":
    sys.exit(main())
