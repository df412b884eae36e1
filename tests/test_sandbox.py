"""Tests for grpo_jax.envs.sandbox: each layer is made to fire, and the host
(this process, its files, its network) is checked to be untouched.

The kernel layers are tested with the audit hook off, each on its own: "namespaces"
(Landlock off) and "landlock" (namespaces off, as where unshare is refused). Where this
machine lacks a mechanism, the test asserts the run's fallback warning instead."""

import concurrent.futures
import os
import textwrap
import time
import tracemalloc

import pytest

from grpo_jax.envs import sandbox
from grpo_jax.envs.sandbox import SandboxResult, run_python


from sandbox_fixtures import _assert_no_connection, listening_server  # noqa: F401, F811 (listening_server: a fixture)


def test_normal_code_runs_and_sees_the_stdlib():
    code = textwrap.dedent("""
        import collections, fractions, itertools, json, math, re
        print(2 ** 100)
        print(math.comb(10, 3), math.isqrt(99))
        print(json.dumps({"a": [1, 2]}, sort_keys=True))
        print(re.findall(r"\\d+", "a1b22c333"))
        print(list(itertools.accumulate([1, 2, 3, 4])))
        print(fractions.Fraction(1, 3) + fractions.Fraction(1, 6))
        print(collections.Counter("abracadabra").most_common(2))
    """)
    result = run_python(code)
    assert result.status == "ok" and result.ok and result.returncode == 0
    assert result.stdout.splitlines() == [
        "1267650600228229401496703205376", "120 9", '{"a": [1, 2]}',
        "['1', '22', '333']", "[1, 3, 6, 10]", "1/2", "[('a', 5), ('b', 2)]"]
    assert result.stderr == "" and not result.truncated
    assert result.as_text() == result.stdout


def test_stdin_small_and_large():
    assert run_python("print(input()[::-1])", stdin="abc\n").stdout == "cba\n"
    big = "y" * 1_000_000  # far more than a pipe buffer: written incrementally
    result = run_python("import sys\nprint(len(sys.stdin.read()))", stdin=big)
    assert result.stdout == "1000000\n", result


def test_exception_is_an_error_with_a_traceback():
    result = run_python("x = 1\ndef f(y):\n    return y / 0\nf(x)\n")
    assert result.status == "error" and result.returncode == 1
    assert "ZeroDivisionError: division by zero" in result.stderr
    assert 'File "main.py", line 3, in f' in result.stderr
    assert "-c" not in result.stderr  # the bootstrap's own frame is hidden
    text = result.as_text()
    assert "stderr:" in text and text.endswith("[error: exit code 1]")
    assert run_python("def f(:\n").status == "error"  # syntax error
    assert run_python("import sys\nsys.exit(3)").returncode == 3


def test_reading_host_files_is_forbidden(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("hunter2-secret-token")
    home = os.path.expanduser("~")
    for code in (
        "print(open('/etc/passwd').read())",
        f"print(open({str(secret)!r}).read())",
        f"import pathlib\nprint(pathlib.Path({str(secret)!r}).read_bytes())",
        f"import os\nprint(os.listdir({home!r}))",
        f"import os\nprint(os.listdir({str(tmp_path)!r}))",
        "import os\nprint(os.listdir('/'))",
        "import os\nos.chdir('/')\nprint(open('etc/passwd').read())",
        "import os\nfd = os.open('/etc', os.O_RDONLY)",  # a directory handle
    ):
        result = run_python(code)
        assert result.status == "forbidden", (code, result)
        assert "SandboxViolation" in result.stderr
        assert "hunter2" not in result.stdout and "root:" not in result.stdout
        assert "secret.txt" not in result.stdout


def test_writing_outside_the_workdir_is_forbidden_and_leaves_nothing(tmp_path):
    target = tmp_path / "pwned.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("original")
    for code in (
        f"open({str(target)!r}, 'w').write('x')",
        f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import shutil\nshutil.copyfile('main.py', {str(target)!r})",
        f"import os\nos.remove({str(keep)!r})",
        f"import os\nos.rename({str(keep)!r}, 'stolen.txt')",
        f"open({str(keep)!r}, 'a').write('more')",
        "import os\nos.symlink('/etc/passwd', 'link')",
        "open('../escape.txt', 'w')",
    ):
        result = run_python(code)
        assert result.status == "forbidden", (code, result)
    assert not target.exists()
    assert keep.read_text() == "original"
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_the_workdir_is_usable_and_deleted_afterwards():
    code = textwrap.dedent("""
        import os, pathlib, shutil, tempfile
        pathlib.Path("data.txt").write_text("hello")
        os.mkdir("sub")
        with open("sub/x.json", "w") as f:
            f.write("[1]")
        scratch = tempfile.mkdtemp()
        shutil.rmtree(scratch)
        print(os.getcwd())
        print(sorted(os.listdir(".")), open("data.txt").read())
    """)
    result = run_python(code)
    assert result.status == "ok" and not result.disk_full, result
    workdir, listing = result.stdout.splitlines()
    assert listing == "['data.txt', 'main.py', 'sub'] hello"
    assert not os.path.exists(workdir)


def test_network_is_refused(listening_server):
    server, port = listening_server
    for code in (
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
        "import socket\nsocket.socket(socket.AF_UNIX)",
        f"import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/')",
    ):
        result = run_python(code)
        assert result.status == "forbidden", (code, result)
    _assert_no_connection(server)


def test_process_creation_is_forbidden():
    for code in (
        "import os\nwhile True:\n    os.fork()",  # fork bomb
        "import subprocess\nsubprocess.run(['true'])",
        "import os\nos.system('true')",
        "import os\nos.execv('/bin/true', ['true'])",
        "import os\nos.posix_spawn('/bin/true', ['true'], {})",
        "import multiprocessing\nmultiprocessing.Process(target=print).start()",
        "import os\nos.kill(1, 0)",
        "import ctypes",
    ):
        start = time.monotonic()
        result = run_python(code)
        assert result.status == "forbidden", (code, result)
        assert time.monotonic() - start < 3


def test_native_code_from_the_workdir_is_forbidden():
    code = textwrap.dedent("""
        import importlib.machinery, importlib.util
        open("evil.so", "wb").write(b"\\x7fELF not really")
        loader = importlib.machinery.ExtensionFileLoader("evil", "evil.so")
        loader.create_module(importlib.util.spec_from_loader("evil", loader))
    """)
    result = run_python(code)
    assert result.status == "forbidden" and "native code" in result.stderr


def test_the_hook_cannot_be_rewritten():
    code = textwrap.dedent("""
        import sys
        frame = sys._getframe()
        while "resolve" not in frame.f_globals:  # up to the bootstrap's frame
            frame = frame.f_back
        frame.f_globals["resolve"].__defaults__ = ()
    """)
    assert run_python(code).status == "forbidden"


def test_endless_loops_time_out():
    result = run_python("while True:\n    pass", timeout_s=1.0)
    assert result.status == "timeout" and 0.9 < result.wall_time_s < 3.0
    assert "timeout after" in result.as_text()
    result = run_python("import time\nprint('started', flush=True)\ntime.sleep(60)",
                        timeout_s=0.5)
    assert result.status == "timeout" and result.wall_time_s < 2.5
    assert result.stdout == "started\n"  # output before the kill is kept


def test_memory_hog_hits_the_memory_limit():
    result = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))",
                        memory_mb=64)
    assert result.status == "memory" and "memory limit" in result.stderr
    assert run_python("x = bytearray(2 * 1024**3)").status == "memory"


def test_huge_output_is_cut_without_buffering_it():
    code = "import sys\nfor _ in range(1000):\n    sys.stdout.write('x' * 100_000)"
    tracemalloc.start()
    try:
        result = run_python(code, max_output_bytes=64_000)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.status == "output_limit" and result.stdout_truncated
    assert result.stdout == "x" * 64_000
    assert peak_bytes < 4 * 1024 * 1024  # 100 MB went by; the parent kept < 4 MB
    assert result.wall_time_s < 3
    assert "output truncated" in result.as_text()
    result = run_python("import sys\nsys.stderr.write('e' * 10_000)", max_output_bytes=100)
    assert result.status == "output_limit" and result.stderr == "e" * 100


def test_host_process_is_unharmed(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    cwd, env = os.getcwd(), dict(os.environ)
    hostile = [
        "import os\nos.environ.clear()\nos.chdir('/')",
        f"import os\nos.chdir({str(tmp_path)!r})",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})",
        f"import os\nos.kill({os.getpid()}, 9)",
        "import signal, os\nos.killpg(0, signal.SIGKILL)",
    ]
    for code in hostile:
        assert run_python(code).status == "forbidden", code
    assert os.getcwd() == cwd and dict(os.environ) == env
    assert canary.read_text() == "alive"
    assert run_python("print('still here')").stdout == "still here\n"


def test_concurrent_runs_are_independent():
    codes = [f"import time\ntime.sleep(0.2)\nprint({i} * {i})" for i in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(run_python, codes))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(6)]


def test_result_text_and_validation():
    result = SandboxResult(status="killed", stdout="", stderr="", returncode=-11,
                           wall_time_s=0.1)
    assert result.as_text() == "[killed by signal 11]"
    ok = SandboxResult(status="ok", stdout="", stderr="", returncode=0, wall_time_s=0.1)
    assert ok.as_text() == "(no output)"
    long = SandboxResult(status="ok", stdout="a" * 50, stderr="", returncode=0,
                         wall_time_s=0.1)
    assert long.as_text(max_chars=10) == "a" * 10 + "\n[... cut]"
    assert set(sandbox.STATUSES) == {"ok", "error", "timeout", "memory", "output_limit",
                                     "disk_limit", "forbidden", "killed"}
    full = SandboxResult(status="disk_limit", stdout="", stderr="", returncode=1,
                         wall_time_s=0.1, disk_full=True)
    assert full.as_text() == "[stopped: disk quota exceeded]"
    with pytest.raises(ValueError):
        run_python("print(1)", timeout_s=0)
