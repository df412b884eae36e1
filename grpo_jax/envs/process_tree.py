"""Finding and killing every descendant of a process, through /proc parent links.

Standard library only: the parent (`grpo_jax.envs.supervisor`) uses it to stop a run, and
the sandbox's child runs this file's source too (it cannot import grpo_jax), where the
subreaper of `isolation` sweeps the orphans a run left behind.
"""

import os, signal


def descendants(root):
    """Live (not zombie) descendants of `root`, parents before children, via /proc."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in (b"Z", b"X"):
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, queue = [], [root]
    while queue:
        for pid in children.get(queue.pop(0), ()):
            found.append(pid)
            queue.append(pid)
    return found


def kill_tree(root, rounds=100):
    """SIGKILLs every descendant of `root` (not `root`), rescanning until none is left:
    a process forked between two scans is found by the next."""
    for _ in range(rounds):
        victims = descendants(root)
        if not victims:
            return
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
