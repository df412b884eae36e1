"""Helpers of the sandbox tests: the kernel layers run alone, a listening server, live processes."""

import os
import socket

import pytest

from grpo_jax.envs import sandbox


def _processes_with_argv(*argv: str) -> list[int]:
    """Pids of live processes whose command line is exactly ``argv`` (any namespace)."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read() == wanted:  # a zombie's command line is empty
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


# The kernel layers alone (the audit hook off): "namespaces" with Landlock off, "landlock"
# with namespaces off, as on a machine that refuses unshare.
LAYERS = {"namespaces": {"landlock": False}, "landlock": {"namespaces": False}}


def _run_below_python(code: str, layer: str, timeout_s: float = 5.0, **kwargs):
    return sandbox._run(code, timeout_s=timeout_s, memory_mb=256, audit_hook=False,
                        **LAYERS[layer], **kwargs)


def _in_force(result, layer: str, namespace: str, landlock: str, fallback: str) -> bool:
    """Whether the layer's mechanism (``namespace`` or ``landlock``) ran; if not, asserts
    that the result says so (``fallback`` is in its warning) and returns False."""
    mechanism = namespace if layer == "namespaces" else landlock
    if mechanism in result.isolation:
        return True
    assert fallback in result.warning, result
    return False


@pytest.fixture
def listening_server():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.3)
    yield server, server.getsockname()[1]
    server.close()


def _assert_no_connection(server):
    with pytest.raises(socket.timeout):
        conn, _ = server.accept()
        conn.close()
