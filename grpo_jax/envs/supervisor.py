"""The parent's side of one sandboxed run: start the child, stream its pipes, stop it.

`supervise` is called by `grpo_jax.envs.sandbox._run` with the child's command line. It
reads stdout, stderr and the helpers' status pipe without blocking into bounded buffers,
feeds stdin, enforces the wall clock, the output limit and (without the tmpfs quota) the
disk quota, and kills every process of the run whatever happens. It returns the raw
`Outcome`; `sandbox` turns it into a `SandboxResult`.
"""

from __future__ import annotations

import dataclasses
import os
import selectors
import signal
import subprocess
import time

from grpo_jax.envs import process_tree

_READ_CHUNK = 65536
_STATUS_BYTES = 65536  # at most this much of the helpers' status report is kept
_DISK_POLL_S = 0.1  # without the tmpfs quota: how often the parent measures the directory


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the parent saw of a run, before interpretation.

    Attributes:
      stdout, stderr: raw output, each at most ``max_output_bytes``.
      stdout_truncated, stderr_truncated: whether that stream passed the limit.
      status_lines: the helpers' report (``isolation.enter``'s status lines).
      stopped_by: "timeout", "output_limit" or "disk_limit" when the parent stopped the
        run, else None.
      returncode: the outer process's exit status as ``subprocess`` reports it.
      wall_time_s: seconds from start to the end of supervision.
    """

    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    status_lines: bytes
    stopped_by: str | None
    returncode: int
    wall_time_s: float


def supervise(argv, workdir, env, stdin_bytes: bytes, timeout_s: float,
              max_output_bytes: int, status_read: int, status_write: int,
              disk_bytes: int, disk_files: int) -> Outcome:
    """Starts the child, streams its pipes with bounded buffers, enforces the wall clock
    (and, without the tmpfs, the disk quota), and kills all it started whatever happens.

    Closes ``status_write`` once the child has it; ``status_read`` stays the caller's.
    """
    start = time.monotonic()
    proc = _start(argv, workdir, env, stdin_bytes, status_write)
    pipes = _Pipes(proc, stdin_bytes, status_read, max_output_bytes)
    try:
        pipes.register()
        stopped_by = _watch(proc, pipes, start, start + timeout_s, workdir, disk_bytes,
                            disk_files)
    finally:
        _stop(proc)
        pipes.close()
    pipes.drain_status()
    return Outcome(
        stdout=bytes(pipes.stdout), stderr=bytes(pipes.stderr),
        stdout_truncated=pipes.overflow[pipes.stdout_fd],
        stderr_truncated=pipes.overflow[pipes.stderr_fd],
        status_lines=bytes(pipes.status), stopped_by=stopped_by,
        returncode=proc.returncode, wall_time_s=time.monotonic() - start)


def _start(argv, workdir, env, stdin_bytes: bytes, status_write: int) -> subprocess.Popen:
    """The child in a new session, with its pipes; the parent's status end closed after."""
    try:
        return subprocess.Popen(
            argv, cwd=workdir, env=env, start_new_session=True, close_fds=True,
            pass_fds=(status_write,),
            stdin=subprocess.PIPE if stdin_bytes else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        os.close(status_write)


class _Pipes:
    """The child's pipes, moved without blocking: stdin fed, outputs kept up to the limit."""

    def __init__(self, proc: subprocess.Popen, stdin_bytes: bytes, status_read: int,
                 max_output_bytes: int):
        self.proc, self.status_read, self.max_output_bytes = proc, status_read, max_output_bytes
        self.stdout_fd, self.stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
        self.stdout, self.stderr, self.status = bytearray(), bytearray(), bytearray()
        self.buffers = {self.stdout_fd: self.stdout, self.stderr_fd: self.stderr}
        self.overflow = {fd: False for fd in self.buffers}
        self.pending_stdin = memoryview(stdin_bytes)
        self.stdin_fd = proc.stdin.fileno() if proc.stdin is not None else -1
        self.selector = selectors.DefaultSelector()

    def register(self) -> None:
        """Makes the pipes non-blocking and watches them (stdin only if there is input)."""
        for fd in (self.stdout_fd, self.stderr_fd, self.status_read):
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ)
        if self.pending_stdin:
            os.set_blocking(self.stdin_fd, False)
            self.selector.register(self.stdin_fd, selectors.EVENT_WRITE)

    def open(self) -> bool:
        """Whether any pipe is still watched (not at EOF, stdin not fully written)."""
        return bool(self.selector.get_map())

    def pump(self, timeout: float) -> str | None:
        """Moves what is ready within ``timeout``; "output_limit" if a stream passed it."""
        stopped_by = None
        for key, _ in self.selector.select(timeout):
            fd = key.fd
            if fd == self.stdin_fd:
                self._feed_stdin()
                continue
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                continue
            if not chunk:
                self.selector.unregister(fd)
                continue
            if fd == self.status_read:
                self.status += chunk[: _STATUS_BYTES - len(self.status)]
                continue
            if self._keep(fd, chunk):
                stopped_by = "output_limit"
        return stopped_by

    def _feed_stdin(self) -> None:
        """Writes the next piece of stdin; closes it when all is written or the child left."""
        try:
            written = os.write(self.stdin_fd, self.pending_stdin[:_READ_CHUNK])
        except (BrokenPipeError, BlockingIOError) as error:
            written = 0 if isinstance(error, BlockingIOError) else len(self.pending_stdin)
        self.pending_stdin = self.pending_stdin[written:]
        if not self.pending_stdin:
            self.selector.unregister(self.stdin_fd)
            self.proc.stdin.close()

    def _keep(self, fd: int, chunk: bytes) -> bool:
        """Appends ``chunk`` up to the limit; whether the stream passed it."""
        buffer = self.buffers[fd]
        buffer += chunk[: self.max_output_bytes + 1 - len(buffer)]
        if len(buffer) > self.max_output_bytes:
            self.overflow[fd] = True
            del buffer[self.max_output_bytes:]
            return True
        return False

    def close(self) -> None:
        """Stops watching and closes the child's pipes (not the status pipe)."""
        self.selector.close()
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def drain_status(self) -> None:
        """Reads whatever the helpers wrote on the status pipe before they ended."""
        try:
            while (len(self.status) < _STATUS_BYTES
                   and (chunk := os.read(self.status_read, _READ_CHUNK))):
                self.status += chunk
        except BlockingIOError:
            pass


def _watch(proc: subprocess.Popen, pipes: _Pipes, start: float, deadline: float,
           workdir: str, disk_bytes: int, disk_files: int) -> str | None:
    """Streams the pipes until the run ends; returns the limit that stopped it, if any."""
    next_disk_poll = start + _DISK_POLL_S
    group_killed = False
    while pipes.open():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return "timeout"
        stopped_by = pipes.pump(min(remaining, _DISK_POLL_S))
        if not stopped_by and time.monotonic() >= next_disk_poll:
            next_disk_poll = time.monotonic() + _DISK_POLL_S
            if _disk_used(workdir, disk_bytes, disk_files):
                stopped_by = "disk_limit"
        if stopped_by:
            return stopped_by
        if not group_killed and proc.poll() is not None:
            # The main process is gone; kill whatever it left behind so
            # that inherited pipe ends close and the loop sees EOF.
            _kill_group(proc.pid)
            group_killed = True
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.001))
    except subprocess.TimeoutExpired:
        return "timeout"
    return None


def _kill_group(pid: int) -> None:
    """SIGKILLs the process group ``pid`` leads, if it still exists."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    """Kills every process of the run and returns once they are gone.

    With a PID namespace, killing its init (the outer process's child) makes the kernel
    kill the rest; the outer process reaps init after that and exits. Without one, the
    outer process is a subreaper: its descendants are found and killed here, and it reaps
    them before exiting.
    """
    if proc.poll() is None:
        process_tree.kill_tree(proc.pid)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc.pid)
    proc.wait()


def _disk_used(workdir: str, max_bytes: int, max_entries: int) -> bool:
    """Whether the directory holds more than ``max_bytes`` (allocated) or ``max_entries``
    files; stops counting at the first limit passed."""
    used, entries, stack = 0, 0, [workdir]
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    used += info.st_blocks * 512
                    if used > max_bytes or entries > max_entries:
                        return True
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue
    return False
