"""A local output on a network or shared filesystem is merged with its parts read ahead.

Cluster outputs are mostly on NFS, Lustre, GPFS, CephFS, SMB or FUSE mounts, where each part's open
and read is a round trip, as on object storage; the merge read them one at a time on every local
path. ``io.mounts`` tells the filesystem from /proc/self/mountinfo (here a file in its format, with
the mounts a cluster node has), and the merge reads ahead there, and only there.
"""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gpubatch.io import mounts
from gpubatch.outputs import merge
from gpubatch.outputs.layout import PARTS_DIR, PREDICTIONS
from gpubatch.outputs.manifest import CommitRef
from gpubatch.outputs.store import OutputStore
from gpubatch.outputs.writer import parquet_writer

INDEX = ["slide", "x", "y", "level"]
#: a cluster node's mounts, as proc(5) writes them (optional fields, escaped spaces, a stacked mount)
NODE_MOUNTS = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
40 22 0:50 / /home rw,relatime shared:20 - nfs4 filer:/home rw,vers=4.2,rsize=1048576,sec=sys
41 22 0:51 / /homework rw,relatime shared:21 - xfs /dev/sdb1 rw,attr2
42 22 0:52 / /lustre/scratch rw,flock - lustre 10.0.0.1@o2ib:/scratch rw,flock,lazystatfs
43 42 8:33 / /lustre/scratch/local\040disk rw,relatime - btrfs /dev/sdc1 rw,ssd
44 22 0:53 / /mnt/remote rw,nosuid,nodev,relatime shared:5 - fuse.sshfs me@host:/ rw,user_id=1000
45 22 0:54 / /tmp rw,nosuid,nodev shared:6 - tmpfs tmpfs rw,size=8g
46 22 0:55 / /data rw,relatime - overlay overlay rw,lowerdir=/a,upperdir=/b,workdir=/c
47 22 0:56 / /data rw,relatime - cifs //srv/share rw,vers=3.1.1
48 22 0:57 / /gpfs/proj rw,relatime - gpfs proj rw
49 22 0:58 / /mnt/cephfs rw,relatime - ceph 10.0.0.2:6789:/ rw,name=admin
"""


@pytest.mark.parametrize(("path", "fstype", "network"), [
    ("/home/u/runs/out", "nfs4", True),
    ("/home", "nfs4", True),
    ("/homework/out", "xfs", False),  # /home is no prefix of it
    ("/lustre/scratch/run1", "lustre", True),
    ("/lustre/scratch/local disk/run1", "btrfs", False),  # the longest mount point holds it
    ("/mnt/remote/out", "fuse.sshfs", True),
    ("/tmp/out", "tmpfs", False),
    ("/data/out", "cifs", True),  # of two mounts on one point, the later one is seen
    ("/gpfs/proj/x", "gpfs", True),
    ("/mnt/cephfs/x", "ceph", True),
    ("/opt/out", "ext4", False),
])
def test_the_filesystem_is_the_longest_mount_point_holding_the_path(tmp_path: Path, path: str, fstype: str,
                                                                   network: bool) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(NODE_MOUNTS)
    assert mounts.filesystem_type(path, str(mountinfo)) == fstype
    assert mounts.on_network_filesystem(path, str(mountinfo)) is network


def test_a_path_is_resolved_first_and_unknown_without_mountinfo(tmp_path: Path) -> None:
    """A symlink into a network mount is on it; with no mountinfo (not Linux) a path is local."""
    shared = tmp_path.resolve() / "shared"
    (shared / "out").mkdir(parents=True)
    (tmp_path / "link").symlink_to(shared / "out")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n30 22 0:50 / {shared} rw - nfs filer:/x rw\n")
    assert mounts.filesystem_type(str(tmp_path / "link"), str(mountinfo)) == "nfs"
    assert mounts.filesystem_type(str(tmp_path / "link"), str(tmp_path / "absent")) is None
    assert not mounts.on_network_filesystem(str(tmp_path / "link"), str(tmp_path / "absent"))


def _local_parts(root: Path, count: int) -> tuple[OutputStore, list[CommitRef]]:
    """A local output with ``count`` committed parts of a few tiles each, and their refs."""
    (root / PARTS_DIR).mkdir(parents=True)
    refs = []
    for shard in range(count):
        rows = 1 + shard % 5
        table = pa.table({"slide": pa.array([f"s{shard}"] * rows), "x": np.arange(rows, dtype=np.int64),
                          "y": np.full(rows, shard, np.int64), "level": np.zeros(rows, np.int32),
                          "score": np.random.default_rng(shard).random(rows).astype(np.float32)})
        buffer = io.BytesIO()
        with parquet_writer(buffer, table.schema) as writer:
            writer.write_table(table)
        name = f"{shard:05d}-a.parquet"
        (root / PARTS_DIR / name).write_bytes(buffer.getvalue())
        refs.append(CommitRef(f"{shard:05d}", name, None))
    return OutputStore(str(root)), refs


class _Reads:
    """The store's reads, counted in flight. The second read waits (bounded) until another read
    is in flight beside it: a merge reading ahead starts more at once; a serial one never does,
    and its second read goes on when the wait runs out, having seen none (no timing is asserted).
    Not ``gated``: no read waits (a merge expected to read serially)."""

    def __init__(self, read: object, gated: bool):
        self.read, self.gated = read, gated
        self.lock = threading.Lock()
        self.calls = self.open = self.most = 0
        self.overlapped = threading.Event()
        self.threads: set[str] = set()

    def __call__(self, name: str) -> bytes:
        with self.lock:
            self.calls, self.open = self.calls + 1, self.open + 1
            second, self.most = self.calls == 2, max(self.most, self.open)
            if self.open > 1:
                self.overlapped.set()
            self.threads.add(threading.current_thread().name)
        try:
            if second and self.gated:
                self.overlapped.wait(timeout=10)
            return self.read(name)  # type: ignore[operator]
        finally:
            with self.lock:
                self.open -= 1


@pytest.mark.parametrize("fstype", ["nfs4", "lustre", "fuse.gcsfuse", "ext4", "tmpfs"])
def test_a_local_output_on_a_network_filesystem_is_merged_reading_ahead(tmp_path: Path, fstype: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The output's folder on a (faked) mount of ``fstype``: on a network filesystem more than one
    part read is in flight at once; on a local disk every part is read on the merging thread, one
    at a time. The merged file is byte for byte a serial merge's."""
    out = tmp_path / "out"
    store, refs = _local_parts(out, 60)
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
                         f"30 22 0:50 / {out.resolve()} rw,relatime shared:2 - {fstype} filer:/out rw\n")
    monkeypatch.setattr(mounts, "MOUNTINFO", str(mountinfo))
    monkeypatch.setattr(merge, "PARTS_AHEAD", 1)
    serial_rows = merge.merge_parquet(store, refs, INDEX, target="serial.parquet")
    monkeypatch.setattr(merge, "PARTS_AHEAD", 8)
    reads = _Reads(store.read_bytes, gated=mounts.is_network_type(fstype))
    monkeypatch.setattr(store, "read_bytes", reads)
    assert merge.merge_parquet(store, refs, INDEX) == serial_rows == sum(1 + s % 5 for s in range(60))
    assert reads.calls == len(refs)
    if mounts.is_network_type(fstype):
        assert 1 < reads.most <= 8, reads.most
        assert threading.current_thread().name not in reads.threads
    else:
        assert reads.most == 1 and reads.threads == {threading.current_thread().name}
    merged = (out / PREDICTIONS).read_bytes()
    assert merged == (out / "serial.parquet").read_bytes()
    assert pq.read_table(out / PREDICTIONS).num_rows == serial_rows
    assert not [t for t in threading.enumerate() if t.name.startswith("gpubatch-merge")]
