"""The sandbox's child bootstrap: the last trusted code before the user's.

`grpo_jax.envs.sandbox` runs this file's source in `python -I -S -B` (the isolated child
cannot import grpo_jax) after `isolation.enter` has put the process in its namespaces and
dropped its privileges. `main` sets the resource limits, forgets the modules the user may not
import, installs the audit hook (the second line of defence, see `sandbox`'s docstring) and
runs `main.py` from the work directory. Standard library only.
"""

import linecache, posix, resource, sys, traceback, types

# Exit codes that say why the child ended. A program that calls sys.exit(86) itself would be
# misread as "memory": harmless, since the status only labels the run.
EXIT_MEMORY = 86
EXIT_FORBIDDEN = 87
NOBODY = 65534
MAX_PROCESSES = 512  # RLIMIT_NPROC when running as nobody (shared by concurrent runs)

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
READABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")


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
    """Runs `main.py` from the cwd under the resource limits and (if `use_hook`) the hook."""
    source_bytes, source_lines = read_main_py()
    hook = make_hook(posix.getcwd(), source_lines)
    set_limits(memory_bytes, cpu_seconds, file_bytes, max_files)
    forget_forbidden_modules()
    module = fresh_main_module()
    if use_hook:
        sys.addaudithook(hook)
    run_main(source_bytes, module, memory_bytes)


def read_main_py():
    """main.py's source as bytes and lines, the lines also in linecache for tracebacks."""
    with open("main.py", "rb") as f:
        source_bytes = f.read()
    source_lines = source_bytes.decode("utf-8", "replace").splitlines(True)
    linecache.cache["main.py"] = (len(source_bytes), None, source_lines, "main.py")
    return source_bytes, source_lines


def inside(path, roots, _type=type, _str=str):
    """Whether the resolved `path` is one of `roots` or below one."""
    if _type(path) is not _str:
        return False
    for root in roots:
        if path == root or path.startswith(root + "/"):
            return True
    return False


def why_forbidden(event, args, _work, _in_stdlib, _resolve=resolve, _inside=inside,
                  _devices=READABLE_DEVICES, _int=int, _str=str, _bytes=bytes, _type=type,
                  _isinstance=isinstance, _function=types.FunctionType,
                  _events=FORBIDDEN_EVENTS, _prefixes=FORBIDDEN_PREFIXES,
                  _modules=FORBIDDEN_MODULES, _writes=WRITE_EVENTS, _lists=LIST_EVENTS,
                  _wflags=WRITE_FLAGS, _rebinds=("__code__", "__defaults__", "__kwdefaults__"),
                  _own_globals=globals()):
    """Why the audit `event` is refused (a message for the user), or None if it may pass.

    `_work` is the work directory (a 1-tuple of roots) and `_in_stdlib` tells standard
    library paths; everything else is bound here, at load time, out of the user's reach.
    """
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


def deny(message, _lines, _write=posix.write, _exit=posix._exit, _getframe=sys._getframe,
         _len=len, _str=str, _code=EXIT_FORBIDDEN):
    """Writes a traceback of main.py's frames ending in `message`, and exits "forbidden"."""
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
        _exit(_code)



def make_hook(workdir, source_lines):
    """The audit hook for a run in `workdir`: refuses what `why_forbidden` names."""
    stdlib_roots = tuple(r for r in (resolve(p) for p in sys.path if p) if r and r != "/")
    # Third-party packages are not part of the interpreter's standard library.
    installed = tuple(r + "/" + d for r in stdlib_roots for d in ("site-packages", "dist-packages"))

    def in_stdlib(path, _inside=inside, _roots=stdlib_roots, _installed=installed):
        """Whether the resolved `path` is in the standard library (not site-packages)."""
        return _inside(path, _roots) and not _inside(path, _installed)

    def hook(event, args, _why=why_forbidden, _deny=deny, _work=(workdir,),
             _in_stdlib=in_stdlib, _lines=tuple(source_lines)):
        """Called by the interpreter before each audited operation."""
        message = _why(event, args, _work, _in_stdlib)
        if message is not None:
            _deny(message, _lines)

    return hook


def set_limits(memory_bytes, cpu_seconds, file_bytes, max_files):
    """Memory, CPU time, file size, open files, no core dumps; processes when nobody."""
    limits = [
        (resource.RLIMIT_AS, memory_bytes, memory_bytes),
        (resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1),
        (resource.RLIMIT_FSIZE, file_bytes, file_bytes),
        (resource.RLIMIT_NOFILE, max_files, max_files),
        (resource.RLIMIT_CORE, 0, 0),
    ]
    if posix.getuid() == NOBODY:  # counts every process of the user: only for nobody
        cap = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        cap = MAX_PROCESSES if cap == resource.RLIM_INFINITY else min(cap, MAX_PROCESSES)
        limits.append((resource.RLIMIT_NPROC, cap, cap))
    for limit, soft, hard in limits:
        resource.setrlimit(limit, (soft, hard))


def forget_forbidden_modules():
    """Modules the bootstrap imported (ctypes) would import again without an audit event."""
    for name in [n for n in sys.modules if n.partition(".")[0] in FORBIDDEN_MODULES]:
        del sys.modules[name]


def fresh_main_module():
    """An empty `__main__` for main.py, with `sys.argv` as if it were run as a script."""
    module = types.ModuleType("__main__")
    module.__file__ = "main.py"
    sys.modules["__main__"] = module
    sys.argv[:] = ["main.py"]
    return module


def run_main(source_bytes, module, memory_bytes):
    """Runs main.py in `module`; a MemoryError exits "memory", other errors exit 1."""
    try:
        exec(compile(source_bytes, "main.py", "exec"), module.__dict__)
    except MemoryError:
        module.__dict__.clear()
        sys.stderr.write("MemoryError: the memory limit of %d MB was exceeded\n"
                         % (memory_bytes >> 20))
        posix._exit(EXIT_MEMORY)
    except SystemExit:
        raise
    except BaseException as error:
        traceback.print_exception(type(error), error, error.__traceback__.tb_next)
        sys.exit(1)
