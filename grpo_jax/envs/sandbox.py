"""Run model-written Python in a separate process that the kernel confines.

``run_python(code)`` writes ``code`` to ``main.py`` in a fresh temporary directory, runs it
in a child interpreter and returns a ``SandboxResult`` (stdout, stderr, exit code, why it
stopped, wall time, and which kernel mechanisms were in force). The directory is deleted
afterwards. This module builds the child's program and reads its result;
``grpo_jax.envs.supervisor`` is the parent's side of the run (pipes, limits, killing).

Threat model. The code comes from a policy being trained: usually harmless, sometimes
careless (endless loops, huge prints, a million files, a daemon left running), now and then
curious (``/etc/passwd``, ``ctypes``). The kernel layers below hold against code that gets
past Python-level checks, including native code; they are not a defence against kernel
exploits. For that, run the trainer in a VM or gVisor.

Layers (``grpo_jax.envs.isolation`` has the kernel ones; docs/reliability.md, "The
sandbox", says what each guarantees and what happens where one is missing):

1. **Namespaces.** New mount, PID, network, IPC and UTS namespaces (through a user
   namespace when plain ``unshare`` is refused). The root is a private tmpfs with read-only
   binds of the system directories and the interpreter; the work directory is a tmpfs of
   ``disk_mb`` (all files together) and ``_MAX_DISK_FILES`` inodes; the rest of the host's
   files are not there. The child is PID 1 of its namespace: when it ends, or the parent
   kills it, the kernel kills every process left in it, ``setsid`` daemons included. The
   network namespace has only a loopback interface, down.
2. **No privileges.** The code runs as ``nobody`` (when the interpreter is readable by
   others) with every capability dropped and ``no_new_privs`` set.
3. **Landlock** (Linux 5.13+): writes only in the work directory, reads only in the
   system directories and the interpreter, no TCP (ABI 4+), no signals out (ABI 6+).
   Without namespaces this is what confines files and network.
4. **Resource limits**: ``RLIMIT_AS`` (memory), ``RLIMIT_CPU``, ``RLIMIT_FSIZE``,
   ``RLIMIT_NOFILE``, ``RLIMIT_CORE=0``, ``RLIMIT_NPROC`` as nobody. The parent enforces
   the wall clock and the output limits, and without the tmpfs polls the directory size.
5. **Isolated interpreter and audit hook** (``sandbox_child``): ``python -I -S -B``, a
   minimal environment, and a PEP 578 hook that refuses writes outside the work directory,
   reads outside the standard library, sockets, subprocesses, ``ctypes`` and native
   extensions (status "forbidden"). It is Python, and the second line: C code gets past it.

Where a kernel mechanism is missing the run still happens, on the layers that remain; the
result's ``warning`` says what is missing and why, and the first such run logs it.
Known limits: the standard library only (no numpy); ``asyncio``, ``multiprocessing`` and
anything that needs subprocesses or sockets are refused by the hook.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import pathlib
import shutil
import signal
import sys
import tempfile
import threading

from grpo_jax.envs import isolation, process_tree, sandbox_child, supervisor

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "disk_limit", "forbidden",
            "killed")

_EXIT_MEMORY = sandbox_child.EXIT_MEMORY
_EXIT_FORBIDDEN = sandbox_child.EXIT_FORBIDDEN
_MAX_OPEN_FILES = 256
_MAX_DISK_FILES = 4096  # files and directories in the work directory
_DEADLINE_MARGIN_S = 10  # helpers give up this long after the timeout if the parent died
# What the code may see: system directories and the interpreter, read-only; device files.
_SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32",
                 "/etc/ld.so.cache", "/etc/localtime")
_DEV_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_REQUIRED = ("filesystem_ns", "pid_ns", "net_ns", "no_privileges")

_log = logging.getLogger(__name__)
_warned: set[str] = set()
_warned_lock = threading.Lock()

# The child's program: the bootstrap modules' sources, loaded as modules (process_tree's
# functions put in isolation's globals, as it cannot import them); the isolation module is
# emptied (its ctypes handles dropped) before the user's code runs.
_LOADER = """\
import sys, types
def load(name, source, **names):
    module = types.ModuleType(name)
    module.__dict__.update(names)
    exec(compile(source, name + ".py", "exec"), module.__dict__)
    return module
tree = load("process_tree", PROCESS_TREE)
isolation = load("isolation", ISOLATION, descendants=tree.descendants, kill_tree=tree.kill_tree)
child = load("sandbox_child", CHILD)
del PROCESS_TREE, ISOLATION, CHILD, tree
isolation.enter(CONFIG)
isolation.__dict__.clear()
del isolation, load
child.main(*LIMITS)
"""
_SOURCES = "PROCESS_TREE = %r\nISOLATION = %r\nCHILD = %r\n" % tuple(
    pathlib.Path(module.__file__).read_text(encoding="utf-8")
    for module in (process_tree, isolation, sandbox_child))


@dataclasses.dataclass(frozen=True)
class SandboxResult:
    """What a sandboxed run produced.

    Attributes:
      status: why it stopped, one of ``STATUSES``: "ok" (exit 0), "error"
        (nonzero exit, e.g. an uncaught exception), "timeout" (wall clock or
        CPU limit), "memory" (memory limit), "output_limit" (stdout or stderr
        passed ``max_output_bytes``), "disk_limit" (failed, or was stopped, with the
        disk quota used up), "forbidden" (the audit hook refused an operation),
        "killed" (ended by some other signal).
      stdout, stderr: decoded output (UTF-8, invalid bytes replaced), each cut
        to ``max_output_bytes`` bytes.
      returncode: the child's exit status as ``subprocess`` reports it
        (negative: killed by that signal).
      wall_time_s: seconds from start to exit.
      stdout_truncated, stderr_truncated: whether output was cut.
      disk_full: the work directory's quota (bytes or files) was used up.
      isolation: the kernel mechanisms in force for this run, in
        ``isolation.MECHANISMS`` order: "filesystem_ns" (private read-only root, tmpfs
        quota), "pid_ns", "net_ns", "no_privileges", "landlock" (files),
        "landlock_net" (TCP), "landlock_scope" (signals, abstract sockets).
      warning: empty when namespaces and dropped privileges were all in force; else what
        is missing, what stands in for it, and why (the first such run logs it).
    """

    status: str
    stdout: str
    stderr: str
    returncode: int
    wall_time_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    disk_full: bool = False
    isolation: tuple[str, ...] = ()
    warning: str = ""

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
            "disk_limit": "stopped: disk quota exceeded",
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
def kernel_isolation() -> tuple[str, ...]:
    """The kernel mechanisms a sandboxed run gets on this machine (probed once)."""
    return run_python("pass").isolation


def run_python(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    max_output_bytes: int = 64_000,
    stdin: str = "",
    disk_mb: int = 16,
) -> SandboxResult:
    """Runs ``code`` as ``__main__`` in a sandboxed child; see the module doc.

    Args:
      code: Python source (standard library only).
      timeout_s: wall-clock limit; the CPU-time limit is its ceiling. At the limit every
        process the code started is killed, daemons included.
      memory_mb: address-space limit of the child.
      max_output_bytes: limit for stdout and for stderr each; a child that
        writes more is killed (status "output_limit") and the output kept so
        far is returned. The parent never buffers more than this per stream.
      stdin: text fed to the child's standard input.
      disk_mb: quota on everything in the work directory together (``main.py`` included);
        the directory also holds at most ``_MAX_DISK_FILES`` files.

    Thread-safe: tool environments may call it from many threads at once.
    """
    return _run(code, timeout_s=timeout_s, memory_mb=memory_mb,
                max_output_bytes=max_output_bytes, stdin=stdin, disk_mb=disk_mb)


def _run(code: str, *, timeout_s: float, memory_mb: int, max_output_bytes: int = 64_000,
         stdin: str = "", disk_mb: int = 16, audit_hook: bool = True, namespaces: bool = True,
         landlock: bool = True) -> SandboxResult:
    """``run_python`` with layers that can be switched off (tests of the others)."""
    if min(timeout_s, memory_mb, max_output_bytes, disk_mb) <= 0:
        raise ValueError("timeout_s, memory_mb, max_output_bytes and disk_mb must be positive")
    workdir = tempfile.mkdtemp(prefix="grpo_sandbox_")
    try:
        with open(os.path.join(workdir, "main.py"), "w", encoding="utf-8",
                  errors="replace") as f:
            f.write(code)
        disk_bytes = disk_mb * 1024 * 1024
        status_read, status_write = os.pipe()  # the helpers' report: what is in force
        config = {"workdir": workdir, "read_paths": _read_paths(), "dev_files": _DEV_FILES,
                  "disk_bytes": disk_bytes, "disk_files": _MAX_DISK_FILES,
                  "deadline_s": math.ceil(timeout_s) + _DEADLINE_MARGIN_S,
                  "namespaces": namespaces, "landlock": landlock, "status_fd": status_write}
        limits = (memory_mb * 1024 * 1024, max(1, math.ceil(timeout_s)), disk_bytes,
                  _MAX_OPEN_FILES, int(audit_hook))
        program = _SOURCES + "CONFIG = %r\nLIMITS = %r\n" % (config, limits) + _LOADER
        argv = [sys.executable, "-I", "-S", "-B", "-u", "-X", "utf8", "-c", program]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        try:
            outcome = supervisor.supervise(
                argv, workdir, env, stdin.encode("utf-8", "replace"), timeout_s,
                max_output_bytes, status_read, status_write, disk_bytes, _MAX_DISK_FILES)
        finally:
            os.close(status_read)  # status_write is closed by supervise once started
        return _result(outcome)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def _read_paths() -> tuple[str, ...]:
    """System directories and the interpreter's installation, as they exist here."""
    executable_prefix = os.path.dirname(os.path.dirname(os.path.realpath(sys.executable)))
    paths = {*_SYSTEM_PATHS, sys.base_prefix, sys.base_exec_prefix, executable_prefix}
    return tuple(sorted(os.path.abspath(p) for p in paths if os.path.lexists(p)))


def _result(outcome: supervisor.Outcome) -> SandboxResult:
    """The run's status, output and isolation, from what the parent and the helpers saw."""
    report = _parse_status(outcome.status_lines)
    returncode = outcome.returncode
    if "exit" in report:
        returncode = os.waitstatus_to_exitcode(report["exit"])
    disk_full = report["disk_full"] or outcome.stopped_by == "disk_limit"
    status = outcome.stopped_by or _status_from_returncode(returncode)
    if disk_full and status in ("error", "killed"):
        status = "disk_limit"
    return SandboxResult(
        status=status,
        stdout=outcome.stdout.decode("utf-8", "replace"),
        stderr=outcome.stderr.decode("utf-8", "replace"),
        returncode=returncode,
        wall_time_s=outcome.wall_time_s,
        stdout_truncated=outcome.stdout_truncated,
        stderr_truncated=outcome.stderr_truncated,
        disk_full=disk_full,
        isolation=report["isolation"],
        warning=_warning(report["isolation"], report["notes"]),
    )


def _parse_status(data: bytes) -> dict:
    """The helpers' status lines as {"isolation", "notes", "disk_full"[, "exit"]}."""
    mechanisms, notes, exit_status, disk_full = set(), [], None, False
    for line in data.decode("utf-8", "replace").splitlines():
        kind, _, text = line.partition(" ")
        if kind == "mech":
            mechanisms.add(text)
        elif kind == "note":
            notes.append(text)
        elif kind == "exit" and text.lstrip("-").isdigit():
            exit_status = int(text)
        elif kind == "disk_full":
            disk_full = True
    report = {"isolation": tuple(m for m in isolation.MECHANISMS if m in mechanisms),
              "notes": notes, "disk_full": disk_full}
    if exit_status is not None:
        report["exit"] = exit_status
    return report


def _warning(mechanisms: tuple[str, ...], notes: list[str]) -> str:
    """What is missing and what stands in for it; logged the first time it is seen."""
    missing = []
    if "filesystem_ns" not in mechanisms:
        guard = ("Landlock and the audit hook keep" if "landlock" in mechanisms
                 else "the audit hook alone keeps")
        missing.append(f"files: no private read-only root; {guard} writes in the work "
                       "directory, and the disk quota is checked by polling its size")
    if "pid_ns" not in mechanisms:
        missing.append("processes: no PID namespace; leftovers are found by their /proc "
                       "parent links and killed")
    if "net_ns" not in mechanisms:
        guard = ("Landlock (TCP) and the audit hook refuse" if "landlock_net" in mechanisms
                 else "the audit hook alone refuses")
        missing.append(f"network: no network namespace; {guard} connections")
    if "no_privileges" not in mechanisms:
        missing.append("privileges: the code keeps the trainer's capabilities")
    if not missing:
        return ""
    summary = "sandbox isolation degraded: " + "; ".join(missing)
    with _warned_lock:
        first = summary not in _warned
        _warned.add(summary)
    text = summary + (" (why: " + "; ".join(notes) + ")" if notes else "")
    if first:
        _log.warning("%s", text)
    return text


def _status_from_returncode(returncode: int) -> str:
    """The status a run that the parent did not stop gets from its exit code."""
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
