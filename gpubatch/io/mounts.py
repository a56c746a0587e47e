"""Which filesystem a local path is on, and whether each file opened there is a network round trip.

A cluster's outputs are usually on a shared filesystem (NFS, Lustre, GPFS, BeeGFS, CephFS, SMB, a
FUSE mount), where opening and reading each small file waits on a server much as an object store
GET does: the run's end reads thousands of parts, and read one at a time they wait one round trip
each. On a local disk (ext4, xfs, btrfs, tmpfs, overlay) the same reads are fast enough that
threads only add overhead. Linux says which filesystem holds a path in ``/proc/self/mountinfo``
(proc(5)): the mount whose mount point is the longest prefix of the resolved path. Elsewhere (no
such file) a path is taken as local.
"""

from __future__ import annotations

import os
import re

MOUNTINFO = "/proc/self/mountinfo"
#: filesystem types whose files are reached over a network (``fuse.*`` too: sshfs, s3fs,
#: gcsfuse, rclone, glusterfs, ...; ``fuseblk``, a local disk through FUSE, is not among them)
NETWORK_TYPES = frozenset({
    "nfs", "nfs4", "lustre", "gpfs", "beegfs", "ceph", "cifs", "smb3", "smbfs", "9p", "afs", "glusterfs",
    "pvfs2", "orangefs", "panfs", "wekafs", "davfs", "ncpfs", "fuse",
})
#: mountinfo writes a space, tab, newline or backslash in a mount point as a 3-digit octal escape
_ESCAPE = re.compile(r"\\([0-7]{3})")


def is_network_type(fstype: str) -> bool:
    """Whether a filesystem of type ``fstype`` (mountinfo's spelling) is reached over a network."""
    return fstype in NETWORK_TYPES or fstype.startswith("fuse.")


def filesystem_type(path: str, mountinfo: str | None = None) -> str | None:
    """The type of the filesystem holding ``path`` (resolved: symlinks followed), as ``mountinfo``
    (default :data:`MOUNTINFO`) names it; None where it cannot be read (not Linux) or names no
    mount of the path. Of mounts on the same point, the last one listed is the one seen."""
    resolved = os.path.realpath(path)
    best: tuple[int, str] | None = None
    try:
        with open(mountinfo or MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                mount = _mount_point_and_type(line)
                if mount is not None and _contains(mount[0], resolved) and (best is None or len(mount[0]) >= best[0]):
                    best = (len(mount[0]), mount[1])
    except OSError:
        return None
    return None if best is None else best[1]


def on_network_filesystem(path: str, mountinfo: str | None = None) -> bool:
    """Whether ``path`` is on a network or shared filesystem (see the module); False when unknown."""
    fstype = filesystem_type(path, mountinfo)
    return fstype is not None and is_network_type(fstype)


def _mount_point_and_type(line: str) -> tuple[str, str] | None:
    """A mountinfo line's mount point (unescaped) and filesystem type: ``ID PARENT MAJ:MIN ROOT
    MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS``; None for a line not so."""
    fields = line.split()
    if len(fields) < 7 or "-" not in fields[6:]:
        return None
    after = fields.index("-", 6) + 1
    if after >= len(fields):
        return None
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]), fields[after]


def _contains(mount_point: str, path: str) -> bool:
    """Whether ``path`` (absolute, resolved) is ``mount_point`` or under it."""
    return mount_point == "/" or path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
