"""The sandbox's kernel layers, each alone with the audit hook off: "namespaces" (Landlock off)
and "landlock" (namespaces off, as where unshare is refused). Where this machine lacks a
mechanism, a test asserts the run's fallback warning instead."""

import logging
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest

from grpo_jax.envs import sandbox
from grpo_jax.envs.sandbox import run_python


from sandbox_fixtures import (LAYERS, _assert_no_connection, _in_force, _processes_with_argv,  # noqa: F401
                              _run_below_python, listening_server)  # listening_server: a fixture


ESCAPES = {  # each writes to T, a path outside the work directory, or raises
    "open": "open(T, 'w').write('x')",
    "os.open": "os.close(os.open(T, os.O_WRONLY | os.O_CREAT, 0o644))",
    "ctypes open": "assert libc.open(T.encode(), os.O_WRONLY | os.O_CREAT, 0o644) >= 0",
    "ctypes creat": "assert libc.creat(T.encode(), 0o644) >= 0",
    "ctypes mkdir": "assert libc.mkdir(T.encode(), 0o755) == 0",
    "subprocess touch": "subprocess.run(['touch', T], check=True, stderr=subprocess.DEVNULL)",
    "os.system": "assert os.system('echo x > ' + T + ' 2>/dev/null') == 0",
    "symlink": ("link = 'link%d' % len(os.listdir('.'))\n"
                "    os.symlink(os.path.dirname(T), link)\n"
                "    open(os.path.join(link, os.path.basename(T)), 'w').write('x')"),
    "hard link": "os.link('main.py', T)",
    "rename": "os.rename('main.py', T)",
}


@pytest.mark.parametrize("layer", LAYERS)
def test_files_outside_the_workdir_cannot_be_created_below_python(tmp_path, layer):
    """Every route, native code included, to four places: a host directory, the work
    directory's parent, the interpreter's own directory, and an existing host file."""
    keep = tmp_path / "keep.txt"
    keep.write_text("original")
    name = f"grpo_escape_{uuid.uuid4().hex}"
    targets = [str(tmp_path / name), os.path.join(tempfile.gettempdir(), name),
               os.path.join(sys.base_prefix, name), str(keep)]
    try:
        for route, attempt in ESCAPES.items():
            code = (f"import ctypes, os, subprocess\n"
                    f"libc = ctypes.CDLL(None, use_errno=True)\n"
                    f"def attempt(T):\n"
                    f"    {attempt}\n"
                    f"for T in {targets!r}:\n"
                    f"    try:\n"
                    f"        attempt(T)\n"
                    f"        print('WROTE', T)\n"
                    f"    except BaseException as error:\n"
                    f"        print('refused', T, type(error).__name__)\n")
            result = _run_below_python(code, layer)
            if not _in_force(result, layer, "filesystem_ns", "landlock",
                             "the audit hook alone keeps writes"):
                return
            assert result.status == "ok", (route, result)
            assert result.stdout.count("refused") >= 3, (route, result.stdout)
            assert not [t for t in targets[:3] if os.path.lexists(t)], route
            # (touch may still set its times where only Landlock guards: metadata is not
            # a write to Landlock)
            assert keep.read_text() == "original", route
    finally:
        for target in targets[:3]:
            if os.path.isdir(target) and not os.path.islink(target):
                os.rmdir(target)
            elif os.path.lexists(target):
                os.remove(target)


@pytest.mark.parametrize("layer", LAYERS)
def test_host_files_are_unreadable_below_python(tmp_path, layer):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2-secret-token")
    code = textwrap.dedent(f"""\
        import ctypes, os
        for attempt in (lambda: open({str(secret)!r}).read(),
                        lambda: os.listdir({str(tmp_path)!r}),
                        lambda: ctypes.CDLL(None).open({str(secret).encode()!r}, 0) >= 0 or 1 / 0):
            try:
                print("READ", attempt())
            except (OSError, ZeroDivisionError) as error:
                print("refused", type(error).__name__)
        try:
            print(os.listdir(os.path.dirname(os.getcwd())))
        except OSError:
            print("refused")
        """)
    result = _run_below_python(code, layer)
    if not _in_force(result, layer, "filesystem_ns", "landlock",
                     "the audit hook alone keeps writes"):
        return
    assert result.status == "ok", result
    lines = result.stdout.splitlines()
    assert lines[:3] == ["refused " + ("FileNotFoundError" if layer == "namespaces" else
                                       "PermissionError")] * 2 + ["refused ZeroDivisionError"]
    # The work directory's parent (/tmp): empty but for it, or not listable.
    assert lines[3] == "refused" or (lines[3].startswith("['grpo_sandbox_")
                                     and lines[3].count(",") == 0), result


FILL_THE_DISK = """\
import os
n = 0
try:
    while True:
        with open("f%d" % n, "wb") as f:
            f.write(b"x" * SIZE)
        n += 1
finally:
    print(n, flush=True)
"""


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("size", [4096, 1])  # the byte quota, then the file-count quota
def test_disk_quota_counts_every_file(layer, size):
    result = _run_below_python(FILL_THE_DISK.replace("SIZE", str(size)), layer, disk_mb=1)
    assert result.status == "disk_limit" and result.disk_full, result
    assert "disk quota exceeded" in result.as_text()
    if _in_force(result, layer, "filesystem_ns", "filesystem_ns",
                 "the disk quota is checked by polling"):
        # The tmpfs refuses the write that does not fit: nothing past the quota is stored.
        files = int(result.stdout)
        assert files <= (2**20 // 4096 if size == 4096 else sandbox._MAX_DISK_FILES)
        assert "No space left on device" in result.stderr
    else:  # polled: stopped within a poll or so
        assert result.wall_time_s < 5, result


def test_disk_quota_with_all_layers():
    result = run_python(FILL_THE_DISK.replace("SIZE", "65536"), disk_mb=2)
    assert result.status == "disk_limit" and result.disk_full, result
    small = run_python("open('a.txt', 'w').write('x' * 10_000)", disk_mb=2)
    assert small.status == "ok" and not small.disk_full


DAEMON = """\
import os, time
if os.fork() == 0:
    os.setsid()  # a new session: out of the run's process group
    if os.fork() == 0:
        os.execv("/bin/sleep", ["sleep", TOKEN])
    os._exit(0)
os.wait()
time.sleep(0.2)
print("daemon started", flush=True)
"""


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("ending", ["exit", "timeout"])
def test_setsid_daemon_does_not_outlive_the_run(layer, ending):
    token = f"{50 + random.random():.9f}"
    probe = subprocess.Popen(["sleep", token])  # the check below does see such a process
    try:
        deadline = time.monotonic() + 5
        while not _processes_with_argv("sleep", token) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _processes_with_argv("sleep", token) == [probe.pid]
    finally:
        probe.kill()
        probe.wait()
    code = DAEMON.replace("TOKEN", repr(token))
    if ending == "timeout":
        code += "time.sleep(60)\n"
    result = _run_below_python(code, layer, timeout_s=3.0 if ending == "timeout" else 10.0)
    assert result.status == ("timeout" if ending == "timeout" else "ok"), result
    assert result.stdout == "daemon started\n" and result.stderr == "", result
    assert _processes_with_argv("sleep", token) == []  # gone when run_python returns
    if layer == "namespaces" and "pid_ns" not in result.isolation:
        assert "leftovers are found by their /proc parent links" in result.warning


@pytest.mark.parametrize("layer", LAYERS)
def test_no_network_below_python(listening_server, layer):
    server, port = listening_server
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)"
    result = _run_below_python(code, layer)
    if not _in_force(result, layer, "net_ns", "landlock_net",
                     "the audit hook alone refuses connections"):
        return
    assert result.status == "error", result
    assert ("Network is unreachable" if layer == "namespaces" else "PermissionError") in (
        result.stderr), result
    _assert_no_connection(server)


@pytest.mark.parametrize("layer", LAYERS)
def test_privileges_are_dropped(layer):
    code = textwrap.dedent("""\
        import os, stat
        for attempt in (lambda: os.chroot("."), lambda: os.setuid(1 if os.getuid() == 0 else 0),
                        lambda: os.mknod("mem", stat.S_IFCHR | 0o600, os.makedev(1, 1)),
                        lambda: os.nice(-5)):
            try:
                attempt()
                print("ALLOWED")
            except PermissionError:
                print("refused")
        """)
    result = _run_below_python(code, layer)
    if _in_force(result, layer, "no_privileges", "no_privileges", "privileges:"):
        assert result.status == "ok" and result.stdout == "refused\n" * 4, result


def test_missing_mechanisms_are_loud_once(caplog, monkeypatch):
    monkeypatch.setattr(sandbox, "_warned", set())
    caplog.set_level(logging.WARNING, logger=sandbox.__name__)
    results = [sandbox._run("print(1)", timeout_s=5, memory_mb=256, namespaces=False,
                            landlock=False) for _ in range(2)]
    for result in results:
        assert result.ok and result.stdout == "1\n", result
        assert "filesystem_ns" not in result.isolation and "landlock" not in result.isolation
        for words in ("no private read-only root", "the audit hook alone keeps writes",
                      "no PID namespace", "no network namespace",
                      "namespaces: disabled", "landlock: disabled"):
            assert words in result.warning, (words, result.warning)
    records = [r for r in caplog.records if "sandbox isolation degraded" in r.getMessage()]
    assert len(records) == 1
    full = run_python("print(1)")
    assert full.isolation == sandbox.kernel_isolation()
    if set(sandbox._REQUIRED) <= set(full.isolation):
        assert full.warning == ""
    else:
        assert full.warning.startswith("sandbox isolation degraded"), full


def test_process_tree_is_still_importable_from_isolation():
    """`kill_tree` and `descendants` moved to `process_tree`; `isolation` re-exports them."""
    from grpo_jax.envs import isolation, process_tree
    assert isolation.kill_tree is process_tree.kill_tree
    assert isolation.descendants is process_tree.descendants
