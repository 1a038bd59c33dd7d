"""bench/peer.py, the PostGraphile side-by-side: its answers check, and that the peer is
optional (skipped with a message, exit 0, when npm is missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench import peer
from tests.conftest import project_root

OURS = {"nodes": [{
    "id": "cons_01", "totalOrderValue": "12.3400", "createdAt": "2026-01-02T03:04:05Z",
    "lastOrderAt": None, "metadata": {"tier": "gold"},
    "orders": {"nodes": [{"id": "ord_1", "amount": "5.0000",
                          "placedAt": "2026-01-01T00:00:00.000Z"}]},
}]}
# The peer's formats for the same values: BigFloat strings, +00:00 offsets.
PEERS = {"nodes": [{
    "id": "cons_01", "totalOrderValue": "12.34", "createdAt": "2026-01-02T03:04:05+00:00",
    "lastOrderAt": None, "metadata": {"tier": "gold"},
    "orders": {"nodes": [{"id": "ord_1", "amount": "5", "placedAt": "2026-01-01T00:00:00+00:00"}]},
}]}


def _differs(change: dict[str, object], where: str) -> str | None:
    peers = {"nodes": [{**PEERS["nodes"][0], **change}]}
    found = peer.difference(peer.normalise(OURS), peer.normalise(peers))
    assert found is not None and found.startswith(where), found
    return found


def test_the_same_values_in_either_format_are_the_same_answer() -> None:
    assert peer.difference(peer.normalise(OURS), peer.normalise(PEERS)) is None


def test_a_different_row_value_or_order_is_a_difference() -> None:
    _differs({"id": "cons_02"}, ".nodes[0].id")
    _differs({"totalOrderValue": "12.3401"}, ".nodes[0].totalOrderValue")
    _differs({"createdAt": "2026-01-02T03:04:06+00:00"}, ".nodes[0].createdAt")
    _differs({"lastOrderAt": "2026-01-02T03:04:05+00:00"}, ".nodes[0].lastOrderAt")
    _differs({"metadata": {"tier": "silver"}}, ".nodes[0].metadata.tier")
    _differs({"orders": {"nodes": []}}, ".nodes[0].orders.nodes: 1 vs 0 items")
    _differs({"email": "a@example.com"}, ".nodes[0].email: only in the peer")


def test_without_npm_the_peer_is_skipped_with_a_message(tmp_path: Path) -> None:
    # given bench/ without the peer's node_modules, and no npm on the PATH
    bench = tmp_path / "bench"
    (bench / "peer").mkdir(parents=True)
    source = project_root() / "bench"
    for name in ("peer.py", "run.py", "workloads.py", "baselines.py"):
        shutil.copy(source / name, bench / name)
    for name in ("package.json", "package-lock.json", "server.mjs"):
        shutil.copy(source / "peer" / name, bench / "peer" / name)
    no_npm = tmp_path / "bin"
    no_npm.mkdir()
    env = {**os.environ, "PATH": str(no_npm)}

    # when the side-by-side runs
    done = subprocess.run([sys.executable, str(bench / "peer.py")], env=env,
                          capture_output=True, text=True, timeout=120, check=False)

    # then it says why it skipped the peer, and succeeds
    assert done.returncode == 0, done.stderr
    assert "PostGraphile peer skipped: npm is not installed" in done.stdout
    assert not (bench / "peer" / "node_modules").exists()
