"""Process mode: worker processes forked from the trainer, killed at the time limit.

Each worker is owned by one thread of a small executor, inherits the registered functions
through the fork (lambdas and closures work), receives pickled arguments, and sends back the
outcome's fields.  Its fds 1 and 2 are a pipe drained into the current call's output.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import gc
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Mapping, Sequence

from grpo_jax.guard.outcome import Breaker, Outcome, call_bounded, count, describe, timed_out


@dataclasses.dataclass
class _Worker:
    pid: int
    conn: Any            # our end of a duplex multiprocessing Pipe
    known: int           # jobs registered when it was forked (it knows keys < known)


class _FdCapture:
    """In a worker, for its whole life: fds 1 and 2 are the write end of one pipe, and a drain
    thread files what arrives under the current call: the call's output ends at a random marker
    written after it returns.  Of each call the first `4 * (limit + 1)` bytes are kept and the
    rest counted; what threads left behind by a call write between calls is dropped."""

    def __init__(self):
        self.read_end, self.write_end = os.pipe()
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.token: bytes | None = None
        self.carry = b""
        self.limit, self.head, self.total = 0, bytearray(), 0
        threading.Thread(target=self._drain, daemon=True, name="grpo-guard-capture").start()

    def start(self, limit: int):
        with self.lock:
            self.limit, self.head, self.total, self.carry = limit, bytearray(), 0, b""
            self.token = os.urandom(16)
            self.done.clear()
        os.dup2(self.write_end, 1)  # again each call: the function may have redirected them
        os.dup2(self.write_end, 2)

    def _file(self, data: bytes):
        self.total += len(data)
        room = 4 * (self.limit + 1) - len(self.head)
        if room > 0:
            self.head += data[:room]

    def _drain(self):
        while chunk := os.read(self.read_end, 1 << 16):
            with self.lock:
                token, data = self.token, self.carry + chunk
                self.carry = b""
                if token is None:
                    continue
                index = data.find(token)
                if index >= 0:
                    self._file(data[:index])
                    self.token = None
                    self.done.set()
                else:  # keep a tail that may be the start of the marker
                    cut = max(0, len(data) - len(token) + 1)
                    self._file(data[:cut])
                    self.carry = data[cut:]

    def finish(self) -> tuple[str, int]:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: B036 - the function may have broken its streams
                pass
        with self.lock:
            token = self.token
        if token is not None:
            os.write(self.write_end, token)  # 16 bytes: one atomic pipe write
            self.done.wait(1.0)
        with self.lock:
            self.token = None
            head, total, limit = bytes(self.head), self.total, self.limit
        text = head.decode("utf-8", "replace")
        return text[:limit + 1], (len(text) if total == len(head) else total)


def _text_stream(fd: int):
    return open(fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)


def _serve(conn, jobs, parent_pid: int):
    """A worker's loop: receive (key, kwargs, limit), run `jobs[key]`, send the outcome fields."""
    try:
        os.setpgid(0, 0)  # its own group: a kill takes its children; a terminal's Ctrl-C does not reach it
    except OSError:
        pass
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        try:
            signal.signal(sig, signal.SIG_DFL)  # not the trainer's handlers
        except (ValueError, OSError):
            pass
    gc.freeze()  # never walk (and so copy) the inherited heap
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    capture = _FdCapture()
    os.dup2(capture.write_end, 1)
    os.dup2(capture.write_end, 2)
    out = err = None
    while True:
        while not conn.poll(1.0):
            if os.getppid() != parent_pid:  # the trainer is gone
                return
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        if sys.stdout is not out or out.closed:  # the parent's at first; or the last call replaced it
            sys.stdout = out = _text_stream(1)
        if sys.stderr is not err or err.closed:
            sys.stderr = err = _text_stream(2)
        reply = _serve_one(payload, jobs, capture)
        try:
            conn.send(reply)
        except (pickle.PicklingError, TypeError, AttributeError, ValueError) as e:
            conn.send(("exception", None, f"the result could not be sent back: {describe(e)}",
                       reply[3], reply[4], 0))


def _serve_one(payload: bytes, jobs, capture: _FdCapture) -> tuple:
    try:
        key, kwargs, limit = pickle.loads(payload)
        fn, convert = jobs[key]
    except BaseException as e:  # noqa: B036
        return ("exception", None, f"the call could not be unpacked: {describe(e)}", "", 0, 0)
    capture.start(limit)
    value, value_chars, kind, error = call_bounded(fn, kwargs, convert, limit)
    output, output_chars = capture.finish()
    return (kind, value, error, output, output_chars, value_chars)


def _exit_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else f"status {status}"


class WorkerPool:
    """Worker processes forked from this one, each owned by one thread of a small executor.

    A job is a (function, convert) pair registered under an integer key; a worker knows the
    jobs registered before it was forked, so one forked earlier is replaced (killed, re-forked)
    the first time it is asked for a newer job.  A call past its time limit kills its worker;
    the owning thread forks a fresh one for its next call.  No worker outlives `close()`, the
    interpreter (atexit), or the parent process (workers exit when their parent is gone).
    """

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"a worker pool needs at least one worker, got {size}")
        self.size = size
        self._jobs: list[tuple[Callable[..., Any], Callable[[Any], Any] | None]] = []
        self._keys: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()       # jobs table and worker set
        self._fork_lock = threading.Lock()  # one fork at a time: no worker inherits another's pipe end
        self._local = threading.local()
        self._workers: dict[int, _Worker] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(size, thread_name_prefix="grpo-guard")
        self._closed = False

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return list(self._workers)

    def _key(self, fn, convert) -> int:
        ident = (id(fn), id(convert))
        with self._lock:
            key = self._keys.get(ident)
            if key is None:  # the table holds the function, so its id is never reused
                key = self._keys[ident] = len(self._jobs)
                self._jobs.append((fn, convert))
        return key

    async def call_many(self, fn, kwargs_list: Sequence[Mapping[str, Any]], *, convert, timeout_s: float,
                        limit: int, breaker: Breaker | None = None) -> tuple[list[Outcome | None], str | None]:
        """`fn(**kwargs)` for each kwargs, each call with its own time limit, spread over the
        workers in one executor task per worker (no event-loop round trip per call).

        Returns (outcomes, why): None for a call that could not be sent (its arguments do not
        pickle, or no worker could start), and `why` the first such reason.
        """
        if self._closed:
            return [None] * len(kwargs_list), "the worker pool is closed"
        key = self._key(fn, convert)
        payloads: list[bytes | None] = []
        why = None
        for kwargs in kwargs_list:
            try:
                payloads.append(pickle.dumps((key, dict(kwargs), limit), pickle.HIGHEST_PROTOCOL))
            except Exception as e:  # noqa: BLE001 - any pickling failure
                payloads.append(None)
                why = why or f"arguments cannot be pickled ({describe(e)})"
        sendable = [i for i, p in enumerate(payloads) if p is not None]
        chunks = [c for c in (sendable[k::self.size] for k in range(self.size)) if c]
        try:
            futures = [self._executor.submit(self._run_chunk, key, [payloads[i] for i in c], timeout_s,
                                             breaker or Breaker(None)) for c in chunks]
        except RuntimeError:  # shut down meanwhile
            return [None] * len(kwargs_list), "the worker pool is closed"
        outcomes: list[Outcome | None] = [None] * len(kwargs_list)
        for chunk, results in zip(chunks, await asyncio.gather(*map(asyncio.wrap_future, futures))):
            for i, (outcome, error) in zip(chunk, results):
                outcomes[i] = outcome
                why = why or error
        return outcomes, why

    def _run_chunk(self, key: int, payloads: list[bytes], timeout_s: float,
                   breaker: Breaker) -> list[tuple[Outcome | None, str | None]]:
        results = []
        for payload in payloads:
            try:
                results.append((breaker.skipped() or breaker.add(self._call(key, payload, timeout_s)), None))
            except OSError as e:  # fork failed (no memory, process limit)
                results.append((None, f"no worker process could start ({describe(e)})"))
        return results

    def _call(self, key: int, payload: bytes, timeout_s: float) -> Outcome:
        worker = getattr(self._local, "worker", None)
        if worker is not None and worker.known <= key:  # forked before this job existed
            self._retire(worker)
            worker = None
        if worker is None:
            worker = self._local.worker = self._fork()
        try:
            try:
                worker.conn.send_bytes(payload)
            except OSError:  # it died between calls: the call goes to a fresh worker
                self._retire(worker)
                worker = self._local.worker = self._fork()
                worker.conn.send_bytes(payload)
            if not worker.conn.poll(timeout_s):
                self._local.worker = None
                self._retire(worker)
                count("guard/killed_workers")
                return timed_out(timeout_s, f" (worker process {worker.pid} killed)")
            kind, value, error, output, output_chars, value_chars = worker.conn.recv()
        except Exception:  # noqa: BLE001 - EOF / broken pipe / garbage: the worker died
            self._local.worker = None
            status = self._retire(worker)
            count("guard/crashed_workers")
            return Outcome(error=f"WorkerDied: the worker process died ({status})", kind="crashed")
        return Outcome(value, error, kind, output, output_chars, value_chars)

    def _fork(self) -> _Worker:
        with self._fork_lock:
            with self._lock:
                jobs = list(self._jobs)
            parent_end, child_end = multiprocessing.Pipe()
            parent_pid = os.getpid()
            with warnings.catch_warnings():  # JAX's (and 3.12's) warning on forking a threaded process:
                # the child runs plain Python only (see the module docstring)
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                warnings.filterwarnings("ignore", message=r".*multi-threaded.*fork", category=DeprecationWarning)
                pid = os.fork()
            if pid == 0:  # the worker: never returns, never runs the parent's atexit handlers
                code = 0
                try:
                    parent_end.close()
                    _serve(child_end, jobs, parent_pid)
                except BaseException:  # noqa: B036
                    code = 1
                finally:
                    os._exit(code)
            child_end.close()
            try:
                os.setpgid(pid, pid)  # also here, so a kill right after the fork takes the group
            except OSError:
                pass
            worker = _Worker(pid, parent_end, len(jobs))
            with self._lock:
                self._workers[pid] = worker
            count("guard/started_workers")
            return worker

    def _retire(self, worker: _Worker) -> str:
        """SIGKILL the worker's process group, reap it; its exit status in words."""
        with self._lock:
            self._workers.pop(worker.pid, None)
        for kill in (os.killpg, os.kill):
            try:
                kill(worker.pid, signal.SIGKILL)
                break
            except OSError:
                continue
        try:
            _, status = os.waitpid(worker.pid, 0)
            described = _exit_status(status)
        except ChildProcessError:
            described = "already reaped"
        worker.conn.close()
        return described

    def close(self):
        """Kill every worker; later calls fall back to threads."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            self._retire(worker)


_pool_lock = threading.Lock()
_pool: WorkerPool | None = None
_pool_size = max(2, min(8, os.cpu_count() or 2))


def default_pool() -> WorkerPool:
    """The process-wide pool of "process"-mode calls (started on first use)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._closed:
            _pool = WorkerPool(_pool_size)
        return _pool


def configure_pool(size: int):
    """Set the number of worker processes (default min(8, CPUs), at least 2); the current
    workers are killed and the next call starts new ones."""
    global _pool_size
    if size < 1:
        raise ValueError(f"need at least one worker, got {size}")
    with _pool_lock:
        _pool_size = int(size)
        pool = _pool
    if pool is not None:
        pool.close()


@atexit.register
def _close_pool():
    if _pool is not None:
        _pool.close()


def can_fork() -> bool:
    return hasattr(os, "fork") and sys.platform != "darwin"  # macOS: fork of a threaded process is unsafe
