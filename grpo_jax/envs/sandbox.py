"""Run model-written Python in a separate, limited process.

``run_python(code)`` writes ``code`` to ``main.py`` in a fresh temporary
directory, runs it in a child interpreter and returns a ``SandboxResult``
(stdout, stderr, exit code, why it stopped, wall time). The directory is
deleted afterwards.

Threat model, stated plainly. The code comes from a policy being trained: it
is usually harmless and sometimes careless (endless loops, huge prints, reading
``/etc/passwd`` because a prompt asked about it), and it is not a determined
attacker with exploits. The layers below stop the careless and the curious;
they are not a security boundary against code written to escape. For that, run
the whole trainer inside a container or VM (gVisor, Firecracker, nsjail with
user namespaces).

Layers, from the kernel outwards:

1. **Process group.** The child starts in a new session; on timeout, output
   overflow or exit, the parent SIGKILLs the whole group, so stray children die
   with it.
2. **Resource limits** set in the child before user code runs: ``RLIMIT_AS``
   (memory), ``RLIMIT_CPU`` (CPU seconds, SIGXCPU), ``RLIMIT_FSIZE`` (largest
   file), ``RLIMIT_NOFILE``, ``RLIMIT_CORE=0``. ``RLIMIT_NPROC`` is not used:
   it does not bind root, which is what the trainer often runs as; process
   creation is refused by layer 5 instead, and the group kill cleans up.
3. **Network namespace.** When ``unshare --net`` works (root, util-linux), the
   child runs in a fresh network namespace whose only interface, loopback, is
   down: no connection can leave it, not even to 127.0.0.1 of the host.
   ``network_isolation()`` says whether this layer is active.
4. **Isolated interpreter**: ``python -I -S -B``: no site-packages, no user
   site, no ``PYTHON*`` variables, no bytecode writes; a minimal environment
   (``HOME`` and ``TMPDIR`` point at the work directory).
5. **Audit hook** (PEP 578, ``sys.addaudithook``) installed before user code:
   files may be written only inside the work directory and read only there or
   in the standard library (opened as files, never as directory handles);
   directory listings likewise; sockets, ``subprocess``, ``os.system``,
   ``os.exec*``, ``os.fork``, ``os.posix_spawn``, ``os.kill``, symlinks and
   hard links, ``ctypes``/``_ctypes``/``_posixsubprocess`` imports, native
   extensions loaded from outside the standard library, ``resource.setrlimit``,
   ``gc`` object walks and rewriting function code or defaults are refused.
   A refused operation ends the program at once with status ``"forbidden"``
   and a short traceback of the user's frames on stderr. The hook binds every
   helper it uses as a default argument (immutable once set, since rewriting
   ``__defaults__`` is itself refused) so that monkeypatching ``os`` or
   builtins does not disable it. It is still Python: a bug in CPython, a
   stdlib module that reaches the OS without an audit event, or a path check
   raced by another thread can get around it.

Known limits: the standard library only (no numpy); ``asyncio``,
``multiprocessing`` and anything that needs subprocesses or sockets are
refused; file *metadata* (``os.stat``) outside the work directory is not
audited by CPython, so the existence of a path can be probed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from grpo_jax.envs import sandbox_child

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "forbidden", "killed")

_EXIT_MEMORY = sandbox_child.EXIT_MEMORY
_EXIT_FORBIDDEN = sandbox_child.EXIT_FORBIDDEN
_MAX_FILE_BYTES = 16 * 1024 * 1024
_MAX_OPEN_FILES = 256
_READ_CHUNK = 65536

# The child's first code: sandbox_child.py's source, run with `-c`.
_CHILD_BOOTSTRAP = pathlib.Path(sandbox_child.__file__).read_text(encoding="utf-8")


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run produced.

    Attributes:
      status: why it stopped, one of ``STATUSES``: "ok" (exit 0), "error"
        (nonzero exit, e.g. an uncaught exception), "timeout" (wall clock or
        CPU limit), "memory" (memory limit), "output_limit" (stdout or stderr
        passed ``max_output_bytes``), "forbidden" (the audit hook refused an
        operation), "killed" (ended by some other signal).
      stdout, stderr: decoded output (UTF-8, invalid bytes replaced), each cut
        to ``max_output_bytes`` bytes.
      returncode: the child's exit status as ``subprocess`` reports it
        (negative: killed by that signal).
      wall_time_s: seconds from start to exit.
      stdout_truncated, stderr_truncated: whether output was cut.
    """

    status: str
    stdout: str
    stderr: str
    returncode: int
    wall_time_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def truncated(self) -> bool:
        return self.stdout_truncated or self.stderr_truncated

    def as_text(self, max_chars: int | None = None) -> str:
        """The result as a tool message for the model.

        Plain stdout when the run ended normally with no stderr; otherwise
        labelled stdout/stderr sections followed by one bracketed line saying
        why it stopped. ``max_chars`` keeps the head of each stream.
        """

        def cut(text: str) -> str:
            if max_chars is not None and len(text) > max_chars:
                return text[:max_chars] + "\n[... cut]"
            return text

        if self.status == "ok" and not self.stderr and not self.truncated:
            return cut(self.stdout) if self.stdout else "(no output)"
        parts = []
        if self.stdout:
            parts.append("stdout:\n" + cut(self.stdout).rstrip("\n"))
        if self.stderr:
            parts.append("stderr:\n" + cut(self.stderr).rstrip("\n"))
        notes = {
            "ok": "finished",
            "error": f"error: exit code {self.returncode}",
            "timeout": f"timeout after {self.wall_time_s:.1f} s",
            "memory": "stopped: memory limit exceeded",
            "output_limit": "stopped: output limit exceeded",
            "forbidden": "stopped: forbidden operation",
            "killed": f"killed by signal {-self.returncode}"
            if self.returncode < 0 else "killed",
        }
        note = notes[self.status]
        if self.truncated:
            note += "; output truncated"
        parts.append(f"[{note}]")
        return "\n".join(parts)


@functools.lru_cache(maxsize=None)
def network_isolation() -> str:
    """'netns' if children run in a fresh network namespace, else 'audit-hook'.

    Probed once per process by running ``unshare --net`` on the interpreter.
    In 'audit-hook' mode the network is refused only by the audit hook.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        return "audit-hook"
    try:
        probe = subprocess.run(
            [unshare, "--net", "--", sys.executable, "-I", "-S", "-c", "pass"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return "audit-hook"
    return "netns" if probe.returncode == 0 else "audit-hook"


def run_python(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    max_output_bytes: int = 64_000,
    stdin: str = "",
) -> SandboxResult:
    """Runs ``code`` as ``__main__`` in a sandboxed child; see the module doc.

    Args:
      code: Python source (standard library only).
      timeout_s: wall-clock limit; the CPU-time limit is its ceiling.
      memory_mb: address-space limit of the child.
      max_output_bytes: limit for stdout and for stderr each; a child that
        writes more is killed (status "output_limit") and the output kept so
        far is returned. The parent never buffers more than this per stream.
      stdin: text fed to the child's standard input.

    Thread-safe: tool environments may call it from many threads at once.
    """
    return _run(code, timeout_s=timeout_s, memory_mb=memory_mb,
                max_output_bytes=max_output_bytes, stdin=stdin, audit_hook=True)


def _run(code: str, *, timeout_s: float, memory_mb: int, max_output_bytes: int,
         stdin: str, audit_hook: bool) -> SandboxResult:
    """``run_python`` with the audit hook optional (tests of the other layers)."""
    if timeout_s <= 0 or memory_mb <= 0 or max_output_bytes <= 0:
        raise ValueError("timeout_s, memory_mb and max_output_bytes must be positive")
    workdir = tempfile.mkdtemp(prefix="grpo_sandbox_")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8",
                  errors="replace") as f:
            f.write(code)
        argv = [sys.executable, "-I", "-S", "-B", "-u", "-X", "utf8",
                "-c", _CHILD_BOOTSTRAP,
                str(memory_mb * 1024 * 1024), str(max(1, math.ceil(timeout_s))),
                str(_MAX_FILE_BYTES), str(_MAX_OPEN_FILES), str(int(audit_hook))]
        if network_isolation() == "netns":
            argv = [shutil.which("unshare") or "unshare", "--net", "--"] + argv
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        return _supervise(argv, workdir, env, stdin.encode("utf-8", "replace"),
                          timeout_s, max_output_bytes)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _supervise(argv, workdir, env, stdin_bytes: bytes, timeout_s: float,
               max_output_bytes: int) -> SandboxResult:
    """Starts the child, streams its pipes with bounded buffers, enforces the
    wall clock, and kills its process group whatever happens."""
    start = time.monotonic()
    deadline = start + timeout_s
    proc = subprocess.Popen(
        argv, cwd=workdir, env=env, start_new_session=True, close_fds=True,
        stdin=subprocess.PIPE if stdin_bytes else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    overflow = {fd: False for fd in buffers}
    stopped_by = None  # "timeout" | "output_limit" when the parent killed it
    group_killed = False
    pending_stdin = memoryview(stdin_bytes)
    stdin_fd = proc.stdin.fileno() if proc.stdin is not None else -1
    selector = selectors.DefaultSelector()
    try:
        for pipe in (proc.stdout, proc.stderr):
            os.set_blocking(pipe.fileno(), False)
            selector.register(pipe.fileno(), selectors.EVENT_READ)
        if stdin_bytes:
            os.set_blocking(stdin_fd, False)
            selector.register(stdin_fd, selectors.EVENT_WRITE)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stopped_by = "timeout"
                break
            for key, _ in selector.select(min(remaining, 0.1)):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        written = os.write(fd, pending_stdin[:_READ_CHUNK])
                    except (BrokenPipeError, BlockingIOError) as error:
                        written = 0 if isinstance(error, BlockingIOError) else len(pending_stdin)
                    pending_stdin = pending_stdin[written:]
                    if not pending_stdin:
                        selector.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    chunk = os.read(fd, _READ_CHUNK)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(fd)
                    continue
                buffer = buffers[fd]
                buffer += chunk[: max_output_bytes + 1 - len(buffer)]
                if len(buffer) > max_output_bytes:
                    overflow[fd] = True
                    del buffer[max_output_bytes:]
                    stopped_by = "output_limit"
            if stopped_by:
                break
            if not group_killed and proc.poll() is not None:
                # The main process is gone; kill whatever it left behind so
                # that inherited pipe ends close and the loop sees EOF.
                _kill_group(proc.pid)
                group_killed = True
        if stopped_by is None:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.001))
            except subprocess.TimeoutExpired:
                stopped_by = "timeout"
    finally:
        _kill_group(proc.pid)
        proc.wait()
        selector.close()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    wall_time_s = time.monotonic() - start
    stdout_fd, stderr_fd = list(buffers)
    return SandboxResult(
        status=stopped_by or _status_from_returncode(proc.returncode),
        stdout=bytes(buffers[stdout_fd]).decode("utf-8", "replace"),
        stderr=bytes(buffers[stderr_fd]).decode("utf-8", "replace"),
        returncode=proc.returncode,
        wall_time_s=wall_time_s,
        stdout_truncated=overflow[stdout_fd],
        stderr_truncated=overflow[stderr_fd],
    )


def _status_from_returncode(returncode: int) -> str:
    if returncode == 0:
        return "ok"
    if returncode == _EXIT_FORBIDDEN:
        return "forbidden"
    if returncode == _EXIT_MEMORY:
        return "memory"
    if returncode == -signal.SIGXCPU:
        return "timeout"
    if returncode < 0:
        return "killed"
    return "error"
