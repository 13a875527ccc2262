"""scripts/bench's helpers for restic and rclone crypt, against the real tools.

The bench itself takes minutes and a sshd of its own; these check the pieces it trusts to
judge the other tools' runs: what it reads from their output and the config it writes.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_bench() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("mynas_bench", str(ROOT / "scripts" / "bench"))
    spec = importlib.util.spec_from_loader("mynas_bench", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mynas_bench"] = module
    loader.exec_module(module)
    return module


bench = _load_bench()


def _tree(root: Path, files: int, size: int) -> int:
    for i in range(files):
        path = root / f"d{i % 3}" / f"f{i}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    return files * size


def test_restic_summary_read_from_a_real_backup(tmp_path: Path) -> None:
    source = tmp_path / "source"
    payload = _tree(source, 7, 3000)
    env = {
        **os.environ,
        "RESTIC_PASSWORD": bench.RESTIC_PASSWORD,
        "RESTIC_CACHE_DIR": str(tmp_path / "cache"),
    }
    repo = ["restic", "-r", str(tmp_path / "repo")]
    subprocess.run([*repo, "init"], env=env, check=True, capture_output=True)
    out = subprocess.run(
        [*repo, "backup", "--json", str(source)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    summary = bench.restic_summary(out)
    assert summary["total_files_processed"] == 7
    assert summary["total_bytes_processed"] == payload
    assert bench.count_check("restic", 7, payload, 7, payload) == "ok"


def test_restic_summary_missing_is_an_error() -> None:
    status = json.dumps({"message_type": "status", "percent_done": 1})
    with pytest.raises(ValueError, match="no summary"):
        bench.restic_summary(f"{status}\nnot json\n")


def test_count_check_names_the_difference() -> None:
    verdict = bench.count_check("rclone", 3, 10, 4, 12)
    assert verdict == "rclone holds 3 files, 10 bytes; source 4, 12"


def test_rclone_config_is_read_by_rclone_and_its_crypt_sizes_are_read(tmp_path: Path) -> None:
    obscured = subprocess.run(
        ["rclone", "obscure", "secret"], check=True, capture_output=True, text=True
    ).stdout.strip()
    text = bench.rclone_config(
        host="127.0.0.1",
        port=2222,
        user="me",
        key_file="/k/client_key",
        known_hosts="/k/known_hosts",
        root="/srv/dest",
        password=obscured,
    )
    conf = tmp_path / "rclone.conf"
    conf.write_text(text)
    dump = json.loads(
        subprocess.run(
            ["rclone", "--config", str(conf), "config", "dump"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    sftp, crypt = dump[bench.RCLONE_SFTP], dump[bench.RCLONE_CRYPT]
    assert sftp["type"] == "sftp"
    assert (sftp["host"], sftp["port"], sftp["user"]) == ("127.0.0.1", "2222", "me")
    assert sftp["key_file"] == "/k/client_key"
    assert sftp["known_hosts_file"] == "/k/known_hosts"
    assert sftp["disable_hashcheck"] == "true"
    assert crypt["type"] == "crypt"
    assert crypt["remote"] == f"{bench.RCLONE_SFTP}:/srv/dest"
    assert crypt["filename_encryption"] == "standard"
    assert crypt["password"] == obscured

    # The same crypt settings over a local directory: rclone copies, and its size is read.
    local = text.replace(f"{bench.RCLONE_SFTP}:/srv/dest", str(tmp_path / "stored"))
    conf.write_text(local)
    source = tmp_path / "source"
    payload = _tree(source, 5, 1000)
    rclone = ["rclone", "--config", str(conf)]
    subprocess.run([*rclone, "copy", str(source), f"{bench.RCLONE_CRYPT}:x"], check=True)
    stored = [p.name for p in (tmp_path / "stored").rglob("*") if p.is_file()]
    assert len(stored) == 5
    assert not any(name.startswith("f") and name.endswith(".bin") for name in stored)
    size = subprocess.run(
        [*rclone, "size", "--json", f"{bench.RCLONE_CRYPT}:x"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert bench.rclone_size(size) == (5, payload)


def test_other_tools_skips_a_missing_one_with_one_line() -> None:
    found, notes = bench.other_tools(lambda tool: None if tool == "restic" else f"/usr/bin/{tool}")
    assert found == ["rclone"]
    assert notes == [
        "restic is not installed: its rows are skipped (Debian: apt-get install restic)"
    ]
    assert bench.other_tools(shutil.which)[0] == ["restic", "rclone"]


def _entry(restic_s: float, rclone_s: float, **checks: str) -> dict[str, Any]:
    entry: dict[str, Any] = {
        tool: {"check": checks.get(tool, "ok")} for tool in ("mynas", "restic", "rclone")
    }
    entry["ratio"] = {
        "speed_restic_s_over_mynas_s": restic_s,
        "speed_rclone_s_over_mynas_s": rclone_s,
    }
    return entry


def test_other_targets_met_missed_and_failed() -> None:
    assert bench.other_targets({"ratio": {}}, "bulk") == []
    [(label, value, ok)] = bench.other_targets(_entry(2.0, 1.2), "encrypted bulk MB/s")
    assert (label, value, ok) == (
        "encrypted bulk MB/s >= 1.5 x restic",
        "2.00x (rclone crypt 1.20x)",
        True,
    )
    assert bench.other_targets(_entry(1.4, 1.2), "small")[0][2] is False
    no_restic = _entry(0.0, 3.0)
    del no_restic["restic"]
    assert bench.other_targets(no_restic, "small") == [
        ("small >= 1.5 x restic", "not measured (rclone crypt 3.00x)", False)
    ]
    # A fast run that failed its check is no fast run.
    [(_, value, ok)] = bench.other_targets(_entry(9.0, 1.0, restic="restic check failed"), "x")
    assert not ok
    assert value.startswith("restic's run failed its check")
    [(_, value, ok)] = bench.other_targets(_entry(2.0, 5.0, rclone="bad"), "x")
    assert ok
    assert value == "2.00x (rclone crypt 5.00x, its check failed)"


def test_import_times_of_a_real_push_import() -> None:
    code = f"import {bench.ENGINE}.__main__, {bench.ENGINE}.owner.push"
    err = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stderr
    found = bench.import_times(err)
    assert found["asyncssh"] is False  # a push loads it only to connect
    names = [name for name, _ in found["top"]]
    assert len(names) == 5
    assert all(not name.startswith(" ") for name in names)
    assert found["total_ms"] >= max(ms for _, ms in found["top"]) > 0
    with_ssh = bench.import_times(err + "import time:       5 |      7000 | asyncssh\n")
    assert with_ssh["asyncssh"] is True
    assert with_ssh["total_ms"] == pytest.approx(found["total_ms"] + 7.0)
    assert bench.import_times("import time: self [us] | cumulative | imported package\n") == {
        "total_ms": 0,
        "top": [],
        "asyncssh": False,
    }


def _run(mynas_s: float, rsync_s: float, rss: float = 70.0) -> dict[str, Any]:
    """One scenario as the bench records it: both tools' medians and their ratio."""
    mine = {"seconds": mynas_s, "internal_seconds": mynas_s / 2, "client_rss_mb": rss}
    return {
        "mynas": mine | {"server_rss_mb": rss + 1, "as_home_assistant_seconds": mynas_s},
        "rsync": {"seconds": rsync_s, "client_rss_mb": 16.0, "server_rss_mb": 40.0},
        "ratio": {"speed_rsync_s_over_mynas_s": rsync_s / mynas_s},
    }


def _peers(owners: int) -> dict[str, Any]:
    """The peers scenario keeps its owners' figures per phase, not per tool's run."""
    phase = {"alone": {"files_per_s": 100.0}}
    together = {
        "host_lag": {"lag_max_ms": 50.0, "lag_p99_ms": 30.0},
        "x_alone": 0.96,
        "sum_of_rates_x_alone": 1.1,
        "server_rss_mb": 106.0,
    }
    return {
        "owners": owners,
        "mynas": phase | {"together": together},
        "rsync": phase,
        "ratio": {},
    }


def test_targets_of_a_whole_run_every_scenario_at_once() -> None:
    """A whole run (every scenario, peers included) gets each target: met or missed."""
    names = ("bulk", "small", "tree-initial", "nochange", "changed", "sparsebundle")
    scenarios: dict[str, Any] = {name: _run(2.0, 1.0) for name in names}
    scenarios["nochange"] = _run(0.4, 1.0)
    scenarios["nochange"]["mynas"] |= {
        "as_home_assistant_lag_max_ms": 140.0,
        "as_home_assistant_lag_p99_ms": 20.0,
    }
    scenarios["small"]["mynas"]["client_rss_mb"] = 250.0
    scenarios["peers"] = _peers(10)
    lag = {"bulk": {"lag_max_ms": 19.0, "lag_p99_ms": 16.0}}
    results = {"scenarios": scenarios, "loop_lag": lag}

    lines = bench.target_lines(results, tree_files=1_000_000, encrypted=True, pinned=True)
    met = {target: ok for target, _, ok in lines}
    assert met["encrypted bulk MB/s >= 1.0 x rsync (--cpu pi)"] is False
    assert met["1,000,000 files: initial push files/s >= 1.0 x rsync"] is False
    assert met["1,000,000 files: no-change time <= 0.5 x rsync (CLI)"] is True
    assert met["1,000,000 files: peak RSS < 150 MB each"] is True
    assert met["1,000,000 files: loop lag max <= 100 ms (no change)"] is False
    assert met["10 owners at once: host loop lag max < 100 ms"] is True
    assert met["10 owners: files/s >= 0.9 x one alone"] is True
    assert met["10 owners: host peak RSS < 300 MB"] is True
    assert met["encrypted push: client peak RSS < 200 MB"] is False  # small files: 250 MB
    assert met["push's event loop lag max <= 100 ms"] is True
    assert (
        "sparsebundle 1 % rewritten <= 0.5 x rsync (CLI)",
        "2.00x (2.00 s vs 1.00 s)",
        False,
    ) in lines

    plain = bench.target_lines(
        {"scenarios": {"peers": _peers(3)}}, tree_files=20_000, encrypted=False, pinned=False
    )
    assert [target for target, _, _ in plain] == [
        "3 owners at once: host loop lag max < 100 ms",
        "3 owners: files/s >= 0.9 x one alone",
        "3 owners: host peak RSS < 300 MB",
    ]
