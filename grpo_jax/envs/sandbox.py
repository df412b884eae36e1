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
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "forbidden", "killed")

# Exit codes the child bootstrap uses to say why it ended. A program that
# calls sys.exit(86) itself would be misread as "memory": harmless, since the
# status only labels the run.
_EXIT_MEMORY = 86
_EXIT_FORBIDDEN = 87
_MAX_FILE_BYTES = 16 * 1024 * 1024
_MAX_OPEN_FILES = 256
_READ_CHUNK = 65536

# The child's first code. It runs before user code, with trusted state only.
_CHILD_BOOTSTRAP = r'''
import linecache, posix, resource, sys, traceback, types

FORBIDDEN_EVENTS = frozenset((
    "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
    "os.kill", "os.killpg", "os.startfile", "os.symlink", "os.link", "os.chown",
    "os.lchown", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
    "os.getxattr", "os.listxattr", "os.add_dll_directory", "subprocess.Popen",
    "pty.spawn", "signal.pthread_kill", "resource.setrlimit", "resource.prlimit",
    "sys._current_frames", "sys._current_exceptions", "gc.get_objects",
    "gc.get_referrers", "gc.get_referents", "sqlite3.enable_load_extension",
    "sqlite3.load_extension", "fcntl.ioctl", "syslog.openlog", "syslog.syslog",
    "webbrowser.open", "_posixsubprocess.fork_exec", "sys.remote_exec",
))
FORBIDDEN_PREFIXES = ("socket.", "ctypes.", "urllib.", "http.client.", "ftplib.",
                      "smtplib.", "poplib.", "imaplib.", "nntplib.", "telnetlib.",
                      "winreg.", "_winapi.", "msvcrt.")
FORBIDDEN_MODULES = frozenset((
    "ctypes", "_ctypes", "_posixsubprocess", "_posixshmem", "_xxsubinterpreters",
    "_xxinterpchannels", "_interpreters", "_interpchannels", "_interpqueues",
    "_testcapi", "_testinternalcapi", "_testmultiphase", "_testbuffer",
    "_testimportmultiple", "_testsinglephase", "_testclinic", "_tkinter",
    "cffi", "_cffi_backend",
))
WRITE_EVENTS = frozenset((
    "os.mkdir", "os.rmdir", "os.remove", "os.rename", "os.truncate", "os.utime",
    "os.chmod", "shutil.rmtree", "shutil.copyfile", "shutil.copymode",
    "shutil.copystat", "shutil.copytree", "shutil.move", "shutil.make_archive",
    "shutil.unpack_archive", "tempfile.mkstemp", "tempfile.mkdtemp", "os.chdir",
))
LIST_EVENTS = frozenset(("os.listdir", "os.scandir"))
WRITE_FLAGS = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND


def resolve(path, _getcwd=posix.getcwd, _readlink=posix.readlink, _str=str,
            _bytes=bytes, _type=type, _OSError=OSError, _ValueError=ValueError):
    """Absolute path with '.', '..' and symlinks resolved; None if refused.

    Relative paths with '..' are refused: they may be relative to a dir_fd,
    which the audit event does not report.
    """
    if _type(path) is _bytes:
        path = path.decode("utf-8", "surrogateescape")
    if _type(path) is not _str or "\x00" in path:
        return None
    if not path.startswith("/"):
        if ".." in path.split("/"):
            return None
        path = _getcwd() + "/" + path
    pending = [c for c in path.split("/") if c and c != "."]
    pending.reverse()
    parts, hops = [], 0
    while pending:
        name = pending.pop()
        if name == "..":
            if parts:
                parts.pop()
            continue
        candidate = "/" + "/".join(parts + [name])
        try:
            target = _readlink(candidate)
        except (_OSError, _ValueError):  # not a link, or missing
            parts.append(name)
            continue
        hops += 1
        if hops > 40:
            return None
        if target.startswith("/"):
            parts = []
        more = [c for c in target.split("/") if c and c != "."]
        more.reverse()
        pending.extend(more)
    return "/" + "/".join(parts)


def main(memory_bytes, cpu_seconds, file_bytes, max_files, use_hook):
    workdir = posix.getcwd()
    with open("main.py", "rb") as f:
        source_bytes = f.read()
    source_lines = source_bytes.decode("utf-8", "replace").splitlines(True)
    linecache.cache["main.py"] = (len(source_bytes), None, source_lines, "main.py")
    stdlib_roots = tuple(r for r in (resolve(p) for p in sys.path if p) if r and r != "/")
    # Third-party packages are not part of the interpreter's standard library.
    installed = tuple(r + "/" + d for r in stdlib_roots for d in ("site-packages", "dist-packages"))
    readable_devices = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")

    def inside(path, roots, _type=type, _str=str):
        if _type(path) is not _str:
            return False
        for root in roots:
            if path == root or path.startswith(root + "/"):
                return True
        return False

    def in_stdlib(path, _inside=inside, _roots=stdlib_roots, _installed=installed):
        return _inside(path, _roots) and not _inside(path, _installed)

    def why_forbidden(event, args, _resolve=resolve, _inside=inside, _work=(workdir,),
                      _in_stdlib=in_stdlib, _devices=readable_devices, _int=int,
                      _str=str, _bytes=bytes, _type=type, _isinstance=isinstance,
                      _function=types.FunctionType, _events=FORBIDDEN_EVENTS,
                      _prefixes=FORBIDDEN_PREFIXES, _modules=FORBIDDEN_MODULES,
                      _writes=WRITE_EVENTS, _lists=LIST_EVENTS, _wflags=WRITE_FLAGS,
                      _rebinds=("__code__", "__defaults__", "__kwdefaults__"),
                      _own_globals=globals()):
        if event in _events or event.startswith(_prefixes):
            return event + " is not permitted"
        if event == "open":
            path, mode, flags = args[0], args[1], args[2]
            if _type(path) is _int:
                return None
            where = _resolve(path)
            writing = bool((flags or 0) & _wflags) or (
                _type(mode) is _str and ("w" in mode or "a" in mode or "x" in mode or "+" in mode))
            if where is not None and (_inside(where, _work) or where == "/dev/null"):
                return None
            if (not writing and where is not None and mode is not None
                    and (_in_stdlib(where) or where in _devices)):
                return None
            return "open(%r, %r): files outside the working directory are %s" % (
                path, mode, "read-only standard library files at most" if not writing
                else "not writable")
        if event in _writes:
            for arg in args:  # path arguments; fds, modes and times pass
                if _type(arg) is _str or _type(arg) is _bytes:
                    where = _resolve(arg)
                    if where is None or not _inside(where, _work):
                        return "%s(%r): only the working directory may be changed" % (
                            event, arg)
            return None
        if event in _lists:
            arg = args[0] if args else None
            if arg is None or _type(arg) is _int:
                return None
            where = _resolve(arg)
            if where is not None and (_inside(where, _work) or _in_stdlib(where)):
                return None
            return "%s(%r): only the working directory may be listed" % (event, arg)
        if event == "import":
            name, filename = args[0], args[1]
            if _type(name) is _str and name.partition(".")[0] in _modules:
                return "import of %s is not permitted" % name
            if filename is not None:
                where = _resolve(filename)
                if where is None or not _in_stdlib(where):
                    return "loading native code from %r is not permitted" % (filename,)
            return None
        if event == "object.__setattr__":  # protect the hook's own functions
            if (_isinstance(args[0], _function) and args[1] in _rebinds
                    and args[0].__globals__ is _own_globals):
                return "rewriting the sandbox's %s is not permitted" % args[1]
        return None

    def deny(message, _write=posix.write, _exit=posix._exit, _getframe=sys._getframe,
             _lines=tuple(source_lines), _len=len, _str=str):
        frames, frame = [], _getframe(0)
        while frame is not None:
            code = frame.f_code
            if code.co_filename == "main.py":
                frames.append((frame.f_lineno, code.co_name))
            frame = frame.f_back
        text = ["Traceback (most recent call last):"]
        for lineno, name in reversed(frames):
            text.append('  File "main.py", line %d, in %s' % (lineno, name))
            if 0 < lineno <= _len(_lines):
                text.append("    " + _lines[lineno - 1].strip())
        text.append("SandboxViolation: " + _str(message))
        try:
            _write(2, ("\n".join(text) + "\n").encode("utf-8", "replace"))
        finally:
            _exit(__EXIT_FORBIDDEN__)

    def hook(event, args, _why=why_forbidden, _deny=deny):
        message = _why(event, args)
        if message is not None:
            _deny(message)

    for limit, soft, hard in (
        (resource.RLIMIT_AS, memory_bytes, memory_bytes),
        (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
        (resource.RLIMIT_FSIZE, file_bytes, file_bytes),
        (resource.RLIMIT_NOFILE, max_files, max_files),
        (resource.RLIMIT_CORE, 0, 0),
    ):
        resource.setrlimit(limit, (soft, hard))
    module = types.ModuleType("__main__")
    module.__file__ = "main.py"
    sys.modules["__main__"] = module
    sys.argv[:] = ["main.py"]
    if use_hook:
        sys.addaudithook(hook)
    try:
        exec(compile(source_bytes, "main.py", "exec"), module.__dict__)
    except MemoryError:
        module.__dict__.clear()
        sys.stderr.write("MemoryError: the memory limit of %d MB was exceeded\n"
                         % (memory_bytes >> 20))
        posix._exit(__EXIT_MEMORY__)
    except SystemExit:
        raise
    except BaseException as error:
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        sys.exit(1)


main(*(int(a) for a in sys.argv[1:]))
'''.replace("__EXIT_FORBIDDEN__", str(_EXIT_FORBIDDEN)).replace(
    "__EXIT_MEMORY__", str(_EXIT_MEMORY))


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
