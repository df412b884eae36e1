"""The sandbox's kernel layer: namespaces, a private read-only root, a disk quota, Landlock.

Standard library only. `grpo_jax.envs.sandbox` runs this file's source in the child
interpreter (which cannot import grpo_jax) before `sandbox_child` installs the audit hook;
`enter(config)` returns only in the process that will run the user's code. The parent
imports it too, for `MECHANISMS`. Process-tree killing is in `process_tree` (re-exported
here); in the child, which cannot import grpo_jax, the loader puts its functions in this
module's globals before running it.

With namespaces (root, or any user where unprivileged user namespaces are allowed), three
processes:

  outer (trainer's PID namespace) -- waits for init, mirrors its exit status
    init (PID 1 of a new PID namespace) -- reaps, records the user's status, exits;
          the kernel then SIGKILLs everything left in the namespace (setsid daemons too)
      user process -- privileges dropped, Landlock on, then the audit hook and main.py

All three share new mount, network, IPC and UTS namespaces. The mount namespace's root is
a small tmpfs holding read-only, nosuid bind mounts of the system directories and the
interpreter's prefix, five device files, and the work directory: a tmpfs of
`disk_bytes` / `disk_files` (the whole quota, not per file), at the same path as on the
host. Nothing else of the host's files is reachable: the old root is detached.

Without namespaces (`namespaces=False`, or unshare refused): one outer process, a child
subreaper, forks the user process; after it ends, every descendant found through /proc
parent links is SIGKILLed and reaped. Landlock (where the kernel has it) then confines
writes to the work directory and reads to the same paths as above, and refuses TCP.

`enter` reports what is in force on `status_fd`, one line each: "mech <name>",
"note <why something is missing>", and at the end "exit <wait status>", "disk_full".
"""

import ctypes, os, platform, signal, stat

if "kill_tree" not in globals():  # imported normally, not loaded by the sandbox's child
    from grpo_jax.envs.process_tree import descendants, kill_tree  # noqa: F401

NOBODY = 65534
MECHANISMS = ("filesystem_ns", "pid_ns", "net_ns", "no_privileges", "landlock", "landlock_net",
              "landlock_scope")

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
MNT_DETACH = 2
CAP_SETFCAP = 31
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 24, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# statvfs f_flag bits -> the mount flags a bind remount must keep (the kernel locks them
# inside a user namespace).
KEPT_FLAGS = ((1, MS_RDONLY), (2, MS_NOSUID), (4, MS_NODEV), (8, MS_NOEXEC),
              (1024, MS_NOATIME), (2048, MS_NODIRATIME), (4096, MS_RELATIME))
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
SYS_LANDLOCK_CREATE, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT = 444, 445, 446
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_MAKE_CHAR, LL_MAKE_BLOCK = 1 << 6, 1 << 11
LL_REFER, LL_TRUNCATE, LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15  # ABI 2, 3, 5
LL_FILE_RIGHTS = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | LL_IOCTL_DEV

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result, what):
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, "%s: %s" % (what, os.strerror(code)))
    return result


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                       enc(data)), "mount %s" % target)


def _prctl(option, arg=0):
    return _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), "prctl %d" % option)


class _Report:
    """Status lines to the parent (each write is one line, atomic on a pipe)."""

    def __init__(self, fd):
        self.fd = fd

    def __call__(self, kind, text=""):
        line = ("%s %s" % (kind, text)).strip().replace("\n", " ") + "\n"
        try:
            os.write(self.fd, line.encode("utf-8", "replace")[:4000])
        except OSError:
            pass


def enter(config):
    """Isolates this process as `config` asks; returns in the user process only.

    config: workdir (the cwd, holding main.py), read_paths (host paths the code may read),
    dev_files, disk_bytes, disk_files, deadline_s (wall-clock backstop for the helper
    processes), namespaces, landlock (bools), status_fd.
    """
    report = _Report(config["status_fd"])
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    in_userns = None
    if config["namespaces"]:
        in_userns = _unshare(report)
    else:
        report("note", "namespaces: disabled")
    if in_userns is not None:
        report("mech", "pid_ns")
        report("mech", "net_ns")
        try:
            _private_root(config)
            report("mech", "filesystem_ns")
        except OSError as error:
            report("note", "private root: %s" % error)
        uid = NOBODY if not in_userns and _others_can_run_python() else None
        _own_workdir(config, uid)
        _run_as_init(config, report)  # returns in the user process
    else:
        uid = NOBODY if os.geteuid() == 0 and _others_can_run_python() else None
        _own_workdir(config, uid)
        _run_as_subreaper(config, report)  # returns in the user process
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _drop_privileges(uid, report)
    if config["landlock"]:
        _landlock(config, report)
    else:
        report("note", "landlock: disabled")
    os.close(config["status_fd"])


# ---------------------------------------------------------------------------- namespaces

def _unshare(report):
    """New mount/PID/net/IPC/UTS namespaces; via a user namespace if plain unshare is refused.

    Returns None if neither works, else whether a user namespace was needed.
    """
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS
    if _libc.unshare(flags) == 0:
        return False
    first = os.strerror(ctypes.get_errno())
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0 and not _has_capability(CAP_SETFCAP):
        # Mapping the host's uid 0 into a user namespace needs CAP_SETFCAP (Linux 5.12+).
        report("note", "unshare: %s; a user namespace cannot map uid 0 without CAP_SETFCAP"
               % first)
        return None
    if _libc.unshare(flags | CLONE_NEWUSER) != 0:
        report("note", "unshare: %s; with a user namespace: %s"
               % (first, os.strerror(ctypes.get_errno())))
        return None
    for name, text in (("setgroups", "deny"), ("uid_map", "0 %d 1" % uid),
                       ("gid_map", "0 %d 1" % gid)):
        try:
            with open("/proc/self/" + name, "w") as f:
                f.write(text)
        except OSError as error:  # mounts will fail and say so
            report("note", "user namespace %s: %s" % (name, error))
    return True


def _has_capability(cap):
    try:
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith("CapEff:"))
    except (OSError, StopIteration):
        return True  # unknown: try
    return bool(int(line.split()[1], 16) >> cap & 1)


def _private_root(config):
    """A tmpfs root with read-only binds of `read_paths` and `dev_files`, pivoted into.

    The tmpfs is mounted over the (host) work directory, which is the one place this
    process knows to be its own; the host sees no change.
    """
    workdir = config["workdir"]
    with open(os.path.join(workdir, "main.py"), "rb") as f:
        config["main_py"] = f.read()
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    root = workdir
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,nr_inodes=4096,mode=0755")
    try:
        links, bound = [], set()
        for path in sorted(set(config["read_paths"]) | set(config["dev_files"]),
                           key=os.path.realpath):
            real = os.path.realpath(path)
            if real != path and os.path.dirname(path) == os.path.realpath(os.path.dirname(path)):
                links.append((path, os.readlink(path)))
            if real in bound or not os.path.exists(real):
                continue
            bound.add(real)
            if os.path.isdir(real):
                os.makedirs(root + real, 0o755, exist_ok=True)
            elif not os.path.exists(root + real):
                os.makedirs(os.path.dirname(root + real), 0o755, exist_ok=True)
                os.close(os.open(root + real, os.O_CREAT | os.O_WRONLY, 0o644))
            # Not recursive: mounts below `real` stay out (list them to bring them in).
            _mount(real, root + real, None, MS_BIND)
            device = path in config["dev_files"]
            _mount(None, root + real, None, MS_BIND | MS_REMOUNT | MS_NOSUID | _kept_flags(
                root + real) | (MS_NOEXEC if device else MS_RDONLY | MS_NODEV))
        for path, target in links:
            if not os.path.lexists(root + path):
                os.makedirs(os.path.dirname(root + path), 0o755, exist_ok=True)
                os.symlink(target, root + path)
        if not os.path.isfile(root + os.__file__):
            raise OSError(2, "the standard library (%s) is not readable here" % os.__file__)
        os.makedirs(root + workdir, 0o755)
        os.chdir(root)
        pivot = getattr(_libc, "pivot_root", None)
        if pivot is not None:
            _check(pivot(b".", b"."), "pivot_root")
        else:
            _check(_libc.syscall(SYS_PIVOT_ROOT[platform.machine()], b".", b"."), "pivot_root")
    except BaseException:
        os.chdir("/")
        _libc.umount2(root.encode(), MNT_DETACH)
        os.chdir(workdir)
        raise
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")  # the host root, stacked under
    os.chdir("/")
    config["pivoted"] = True


def _kept_flags(path):
    f_flag = os.statvfs(path).f_flag
    return sum(ms for st, ms in KEPT_FLAGS if f_flag & st and ms != MS_RDONLY)


def _own_workdir(config, uid):
    """Gives the work directory to the user: with the private root, a fresh tmpfs of
    `disk_bytes` and `disk_files` inodes (then the root is made read-only); without it,
    the host directory, chowned when the code runs as nobody."""
    workdir, owner = config["workdir"], 0 if uid is None else uid
    main_py = os.path.join(workdir, "main.py")
    if config.get("pivoted"):
        _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV,
               "size=%d,nr_inodes=%d,mode=0700,uid=%d,gid=%d"
               % (config["disk_bytes"], config["disk_files"], owner, owner))
        with open(main_py, "wb") as f:
            f.write(config.pop("main_py"))
        _mount(None, "/", None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.chdir(workdir)
    if uid is not None:
        for name in (workdir, main_py):
            os.chown(name, owner, owner)


def _others_can_run_python():
    """Whether a user other than the owner can read the standard library (every directory
    above it searchable): then the code can run as nobody."""
    path = os.path.dirname(os.__file__)
    parts = path.split("/")
    for i in range(1, len(parts) + 1):
        mode = os.stat("/".join(parts[:i]) or "/").st_mode
        if not mode & stat.S_IXOTH:
            return False
    return bool(os.stat(path).st_mode & stat.S_IROTH)


# ---------------------------------------------------------------------------- processes

def _run_as_init(config, report):
    """Forks init (PID 1 of the new namespace), which forks the user process and returns
    in it. The outer process and init never return."""
    child = os.fork()
    if child:
        _outer_wait(child, config)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the parent killed -> init killed -> all killed
    _arm_deadline(config)
    user = os.fork()
    if user == 0:
        signal.alarm(0)
        return
    status = _reap_until(user)
    disk_full = False
    try:
        usage = os.statvfs(config["workdir"])
        disk_full = config.get("pivoted", False) and (usage.f_bavail == 0 or usage.f_favail == 0)
    except OSError:
        pass
    report("exit", str(status))
    if disk_full:
        report("disk_full")
    os._exit(_exit_code(status))  # init exits: the kernel SIGKILLs the rest of the namespace


def _run_as_subreaper(config, report):
    """No PID namespace: a subreaper outer process, so that orphans (setsid daemons) stay
    its descendants and are swept when the user process ends."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    user = os.fork()
    if user == 0:
        _prctl(PR_SET_CHILD_SUBREAPER, 0)
        return
    _arm_deadline(config, on_expiry=lambda: kill_tree(os.getpid()))
    status = _reap_until(user)
    kill_tree(os.getpid())
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break
    report("exit", str(status))
    os._exit(_exit_code(status))


def _outer_wait(child, config):
    _arm_deadline(config, on_expiry=lambda: os.kill(child, signal.SIGKILL))
    status = _reap_until(child)
    if os.WIFSIGNALED(status):
        signal.signal(os.WTERMSIG(status), signal.SIG_DFL)
        os.kill(os.getpid(), os.WTERMSIG(status))
    os._exit(_exit_code(status))


def _arm_deadline(config, on_expiry=None):
    """A backstop if the parent dies: after `deadline_s` the helper gives up the run."""
    def expire(signum, frame):
        if on_expiry is None:
            os._exit(128 + signal.SIGALRM)
        on_expiry()
    signal.signal(signal.SIGALRM, expire)
    signal.alarm(config["deadline_s"])


def _reap_until(pid):
    """Reaps children (orphans included) until `pid` ends; returns its wait status."""
    while True:
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            return 128 + signal.SIGKILL
        if done == pid:
            return status


def _exit_code(status):
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


# ---------------------------------------------------------------------------- privileges

class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


def _drop_privileges(uid, report):
    """Becomes `uid` (nobody) when given; drops every capability (bounding, ambient,
    effective, permitted, inheritable) and sets no_new_privs, so that neither this process
    nor anything it executes can mount, unshare its way back, ptrace or load modules."""
    try:
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        for cap in range(64):
            if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
                if ctypes.get_errno() == 22:  # EINVAL: past the last capability
                    break
        _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0)
        header, data = _CapHeader(0x20080522, 0), (ctypes.c_uint32 * 6)()
        _check(_libc.capset(ctypes.byref(header), data), "capset")
        _check(_libc.capget(ctypes.byref(header), data), "capget")
        if any(data):
            raise OSError(1, "capabilities left: %r" % list(data))
        report("mech", "no_privileges")
    except OSError as error:
        report("note", "privileges: %s" % error)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)


# ---------------------------------------------------------------------------- landlock

class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _landlock(config, report):
    """Landlock rules: read and execute `read_paths`; read and write `dev_files`; anything
    but device nodes in the work directory; no TCP (ABI 4+); no signals or abstract unix
    sockets outside this process tree (ABI 6+). Applies to this process and its children
    for good, whatever their privileges."""
    abi = _libc.syscall(SYS_LANDLOCK_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        report("note", "landlock: %s" % os.strerror(ctypes.get_errno()))
        return
    handled = (1 << 13) - 1
    for version, right in ((2, LL_REFER), (3, LL_TRUNCATE), (5, LL_IOCTL_DEV)):
        if abi >= version:
            handled |= right
    attr = (ctypes.c_uint64 * 3)(handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    try:
        ruleset = _check(_libc.syscall(SYS_LANDLOCK_CREATE, attr, ctypes.c_size_t(size),
                                       ctypes.c_uint32(0)), "landlock_create_ruleset")
        read = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR
        rules = [(p, read) for p in config["read_paths"]]
        rules += [(p, LL_READ_FILE | LL_WRITE_FILE | LL_TRUNCATE) for p in config["dev_files"]]
        rules.append((config["workdir"], handled & ~(LL_MAKE_CHAR | LL_MAKE_BLOCK | LL_IOCTL_DEV)))
        for path, rights in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # absent here (e.g. hidden by the private root)
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    rights &= LL_FILE_RIGHTS
                rule = _PathBeneath(rights & handled, fd)
                _check(_libc.syscall(SYS_LANDLOCK_ADD_RULE, ruleset, 1, ctypes.byref(rule),
                                     ctypes.c_uint32(0)), "landlock_add_rule %s" % path)
            finally:
                os.close(fd)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _check(_libc.syscall(SYS_LANDLOCK_RESTRICT, ruleset, ctypes.c_uint32(0)),
               "landlock_restrict_self")
        os.close(ruleset)
    except OSError as error:
        report("note", "landlock: %s" % error)
        return
    report("mech", "landlock")
    if abi >= 4:
        report("mech", "landlock_net")
    if abi >= 6:
        report("mech", "landlock_scope")
