"""Python processes started warm: a fork server that has done a program's imports once, forking each process of it.

A training worker spends ~3.5 s of a core importing torch, its distributed checkpointing and transformers' model code
before its first step, and a tiny or resumed run trains for less than that. A fork server imports them once and
forks each worker from itself: the worker starts with its imports done (measured on the tiny model's 2-step run:
5.2 CPU-s and 5.0 s cold, 1.6 CPU-s and 1.3 s forked).

    proc = popen([sys.executable, "-m", "tasks.train.worker", job_file], env, preload=(...))

runs the command as `subprocess.Popen` would (stdout and stderr to one text pipe, the given environment) in a process
forked from the server of `preload`, started on first use under a lock, in a session of its own, and ending after
IDLE_S without work. What a cold start would see differently is part of the server's identity, so a server is only
ever used by the processes it is right for: the Python, the preloaded packages' files, and the environment that
modules read as they are imported (IMPORT_TIME_ENV). Everything else of the environment (the run's home, its ports,
its rank) is set in the forked process before the program runs. Anything that prevents a fork (no fork on this
platform, a machine with GPUs, TESSERA_FORKSERVER=0, a server that fails to start) falls back to a cold start.

A forked process is the server's child, not the caller's: it is known and signalled by its pid (ForkedProcess), and a
program started so must end by itself when its owner is gone (the training worker watches its train stage's process).
The servers live in TESSERA_HOME/workers (TESSERA_FORKSERVER_DIR elsewhere), one socket, lock and log each;
`tessera server stop` stops them (stop_all).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

IDLE_S = 600.0  # a server with no process running and no request for this long ends
START_TIMEOUT_S = 120.0  # its imports take ~3.5 s on a quiet machine, much longer on a busy one
# Environment read while modules are imported (thread counts, allocators, library paths, caches and offline modes,
# locale): a process forked from a server started with other values would not run as a cold start would.
IMPORT_TIME_ENV = ("PYTHON", "LD_", "MALLOC_", "OMP_", "MKL_", "KMP_", "GOMP_", "OPENBLAS_", "TORCH", "PYTORCH_",
                   "CUDA_", "NCCL_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "USE_", "LANG", "LC_")


def servers_dir() -> Path:
    from tessera.core.paths import tessera_home

    return Path(os.environ.get("TESSERA_FORKSERVER_DIR") or tessera_home() / "workers").resolve()


def _identity(preload: tuple[str, ...], env: dict[str, str]) -> str:
    """What makes two servers interchangeable: the host (a home shared by several machines holds a server of each;
    a socket reaches only its own host's), the interpreter, the preloaded packages' files as they are now (an
    upgrade or an edit starts a new server) and the import-time environment."""
    import importlib.util

    parts = [socket.gethostname(), sys.executable, *preload]
    for top in sorted({m.split(".")[0] for m in preload} | {"tessera"}):  # tessera: the server's own code
        spec = importlib.util.find_spec(top)
        root = Path(spec.origin).parent if spec and spec.origin else None
        if root is None:
            continue
        # our own packages are small and edited: every file; a library's (site-packages) changes with its __init__
        files = [root / "__init__.py"] if "site-packages" in root.parts else sorted(root.rglob("*.py"))
        for f in files:
            with suppress(OSError):
                st = f.stat()
                parts.append(f"{f}:{st.st_mtime_ns}:{st.st_size}")
    parts += sorted(f"{k}={v}" for k, v in env.items() if k.startswith(IMPORT_TIME_ENV))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# --- the caller's side --------------------------------------------------------------------------------------------


class ForkedProcess:
    """A process forked by a server, with what the caller uses of subprocess.Popen: pid, stdout (text), poll(),
    wait(), send_signal(), terminate(), kill(), returncode (negative: the signal that ended it), a `with` block."""

    def __init__(self, conn: socket.socket, pid: int, stdout):
        self._conn, self.pid, self.stdout, self.returncode = conn, pid, stdout, None
        self._buffer = b""

    def _read_status(self, timeout: float) -> None:
        while self.returncode is None and select.select([self._conn], [], [], max(timeout, 0))[0]:
            chunk = self._conn.recv(4096)
            if not chunk:  # the server died: the process, reparented, is waited for by its pid
                from tessera.core.processes import process_alive

                while process_alive(self.pid):
                    time.sleep(0.1)
                self.returncode = 1  # its own exit code went with the server
                return
            self._buffer += chunk
            if b"\n" in self._buffer:
                self.returncode = json.loads(self._buffer.split(b"\n", 1)[0])["returncode"]
            timeout = 0

    def poll(self) -> int | None:
        self._read_status(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = 0.5 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            self._read_status(min(left, 0.5))
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def __enter__(self) -> ForkedProcess:
        return self

    def __exit__(self, *exc) -> None:
        with suppress(OSError):
            self.stdout.close()
        try:
            self.wait()
        finally:
            self._conn.close()


def popen(cmd: list[str], env: dict[str, str], preload: tuple[str, ...]):
    """`cmd` started as subprocess.Popen(cmd, stdout=PIPE, stderr=STDOUT, text=True, env=env) would, forked from the
    server of `preload` when `cmd` is this Python running one of those modules (`python -m MODULE ARGS`); cold
    otherwise, and wherever forking is not possible."""
    cold = lambda: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)  # noqa: E731
    if (sys.platform != "linux" or os.environ.get("TESSERA_FORKSERVER", "1") == "0" or _has_gpus() or len(cmd) < 3
            or cmd[:2] != [sys.executable, "-m"] or cmd[2] not in preload):
        return cold()
    try:
        conn = _connect(preload, env)
    except OSError as exc:
        print(f"starting cold: no fork server ({exc})", file=sys.stderr)
        return cold()
    read_end, write_end = os.pipe()
    try:
        request = json.dumps({"module": cmd[2], "args": cmd[3:], "env": env, "cwd": os.getcwd()}).encode()
        socket.send_fds(conn, [struct.pack("!I", len(request)) + request], [write_end])
        os.close(write_end)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(4096)
            if not chunk:
                raise OSError("the fork server closed the connection before it forked")
            reply += chunk
        pid = json.loads(reply)["pid"]
    except (OSError, ValueError, KeyError) as exc:
        conn.close()
        with suppress(OSError):
            os.close(read_end)
        with suppress(OSError):
            os.close(write_end)
        print(f"starting cold: the fork server failed ({exc})", file=sys.stderr)
        return cold()
    return ForkedProcess(conn, pid, io.open(read_end, "r", errors="backslashreplace"))


def _has_gpus() -> bool:
    """Whether this machine has NVIDIA or AMD GPUs. There processes start cold: a library that touches the CUDA
    driver as it is imported would leave every process forked from the server unable to use CUDA ("Cannot
    re-initialize CUDA in forked subprocess"), and a GPU run's imports are a small part of it."""
    nvidia = Path("/proc/driver/nvidia/gpus")
    return (nvidia.is_dir() and any(nvidia.iterdir())) or Path("/dev/kfd").exists()


def _connect(preload: tuple[str, ...], env: dict[str, str]) -> socket.socket:
    """A connection to the server for `preload` and this environment, started (under its lock) if none answers."""
    from tessera.core.paths import file_lock

    folder = servers_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = _identity(preload, env)
    address = folder / f"{key}.sock"
    if len(os.fsencode(address)) > 100:  # a Unix socket's path is limited (108 bytes on Linux)
        raise OSError(f"{address} is too long a path for a socket: set TESSERA_FORKSERVER_DIR to a shorter folder")
    failed = folder / f"{key}.failed"  # kept: every start would fail the same way (its log says why)
    with file_lock(folder / f"{key}.lock"):
        try:
            return _dial(address)
        except OSError:
            if failed.exists():
                raise OSError(f"it failed to start before (see {folder / f'{key}.log'})") from None
        with open(folder / f"{key}.log", "ab") as log:
            server = subprocess.Popen([sys.executable, "-m", "tessera.core.forkserver", str(address), *preload],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                      env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # it listens once its imports are done
            try:
                return _dial(address)
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    with suppress(OSError):
                        server.kill()
                    failed.touch()
                    raise OSError(f"the fork server did not start (see {folder / f'{key}.log'})") from None
                time.sleep(0.05)


def _dial(address: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(address))
    except OSError:
        conn.close()
        raise
    return conn


def stop_all() -> int:
    """Stop every fork server in servers_dir(): each forks no more and ends once the processes it forked have ended
    (they run on). How many were running."""
    import signal

    from tessera.core.processes import process_alive

    stopped = 0
    for pid_file in servers_dir().glob("*.pid"):
        with suppress(OSError, ValueError):
            pid, started = json.loads(pid_file.read_text())
            if process_alive(pid, started):
                os.kill(pid, signal.SIGTERM)
                stopped += 1
    return stopped


def forked() -> list[tuple[int, list[str]]]:
    """The processes forked by the servers in servers_dir() that still run: (pid, the command each runs). A process
    listing shows the fork server's own command line for them."""
    from tessera.core.processes import process_alive

    found = []
    for record in servers_dir().glob("*.forked"):
        with suppress(OSError, ValueError):
            for pid, (started, command) in json.loads(record.read_text()).items():
                if process_alive(int(pid), started):
                    found.append((int(pid), command))
    return found


# --- the server's side --------------------------------------------------------------------------------------------


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    conn.settimeout(10)
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 2)
    if len(data) < 4 or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise OSError("a request without its length or its output pipe")
    size = struct.unpack("!I", data[:4])[0]
    data = data[4:]
    while len(data) < size:
        chunk = conn.recv(1 << 16)
        if not chunk:
            raise OSError("a request cut short")
        data += chunk
    return json.loads(data), fds


def run_as_main(module: str, args: list[str], env: dict[str, str], cwd: str, out_fd: int) -> None:
    """In a process just forked: become the program `python -m MODULE ARGS` in the environment `env` and the folder
    `cwd`, in a session of its own, writing to `out_fd` (stdout and stderr), and exit with its exit code. Never
    returns. The fork server's processes start so, and so do the ranks tasks.train.standalone forks from itself."""
    import atexit
    import runpy
    import signal
    import traceback

    code = 1
    try:
        os.setsid()  # a session of its own, as torchrun gives its workers: the server's end does not reach it
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(devnull)
        os.close(out_fd)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))  # a pipe: block-buffered stdout, as a cold start's
        sys.stdin = open(0, closefd=False)
        sys.stdout = open(1, "w", buffering=1 if unbuffered else -1, closefd=False, errors="backslashreplace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
        sys.argv = [module, *args]
        sys.modules.pop(module, None)  # run as __main__ alone, as `python -m` runs it (imported, runpy warns)
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - as Python itself: the traceback, exit code 1
            traceback.print_exc()
        atexit._run_exitfuncs()
        with suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
    finally:
        os._exit(code)


def serve(address: str, preload: list[str]) -> None:
    """Import `preload`, then fork a process for each request on `address` until IDLE_S pass with none running."""
    import importlib
    import signal

    # Libraries that start threads as they load, unless told not to: numpy's and scipy's OpenBLAS its pool (the
    # programs compute with torch's own threads, started in each forked process as it needs them), pyarrow's jemalloc
    # a background thread that returns freed memory
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")
    for module in preload:
        importlib.import_module(module)
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:  # a fork copies only the thread calling it: one holding a lock would leave it locked forever
        sys.exit(f"fork server: {threads} threads after importing {preload}; forking would be unsafe")
    with suppress(FileNotFoundError):
        os.unlink(address)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address + ".new")
    listener.listen(64)
    os.rename(address + ".new", address)  # answers only once it can fork
    from tessera.core.paths import write_atomic
    from tessera.core.processes import create_time

    pid_file = Path(address).with_suffix(".pid")
    write_atomic(pid_file, json.dumps([os.getpid(), create_time(os.getpid())]))
    print(f"fork server {os.getpid()}: {len(sys.modules)} modules imported, listening on {address}", flush=True)
    running: dict[int, tuple[socket.socket, float, list[str]]] = {}  # pid -> its caller, start time, command
    forked_file = Path(address).with_suffix(".forked")

    def record_running() -> None:  # for forked()
        write_atomic(forked_file, json.dumps({pid: [started, cmd] for pid, (_, started, cmd) in running.items()}))

    last_work, stopping = time.monotonic(), []
    # SIGTERM (stop_all, `tessera server stop`) ends it as running out of work does: no new process, and each one
    # running still gets its exit status to its caller
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    # an ended process wakes the loop at once (its caller is waiting for its exit status), through a byte on a pipe
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    while running or not (stopping or time.monotonic() - last_work > IDLE_S):
        if stopping and listener.fileno() != -1:
            listener.close()
            with suppress(OSError):
                os.unlink(address)
        ready = select.select([wake_read] + ([listener] if listener.fileno() != -1 else []), [], [], 0.2)[0]
        if wake_read in ready:
            os.read(wake_read, 4096)
        if listener in ready:
            conn, _ = listener.accept()
            last_work = time.monotonic()
            try:
                request, fds = _receive(conn)
            except (OSError, ValueError) as exc:
                print(f"a bad request: {exc}", flush=True)
                conn.close()
                continue
            pid = os.fork()
            if pid == 0:
                signal.set_wakeup_fd(-1)
                for sock in (listener, conn, *(caller for caller, _, _ in running.values())):
                    sock.close()
                os.close(wake_read)
                os.close(wake_write)
                run_as_main(request["module"], request["args"], request["env"], request["cwd"], fds[0])
            for fd in fds:
                os.close(fd)
            command = [sys.executable, "-m", request["module"], *request["args"]]
            print(f"forked {pid}: {' '.join(command)}", flush=True)
            running[pid] = (conn, create_time(pid), command)
            record_running()
            with suppress(OSError):
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        while running:  # the exit status of each forked process that ended goes to its caller
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            conn, _, _ = running.pop(pid)
            record_running()
            code = os.waitstatus_to_exitcode(status)
            print(f"{pid} ended: exit code {code}, {usage.ru_utime + usage.ru_stime:.1f} CPU-s", flush=True)
            with suppress(OSError):
                conn.sendall(json.dumps({"returncode": code}).encode() + b"\n")
            conn.close()
            last_work = time.monotonic()
    if listener.fileno() != -1:
        listener.close()
        with suppress(OSError):
            os.unlink(address)
    for path in (pid_file, forked_file):
        with suppress(OSError):
            os.unlink(path)


if __name__ == "__main__":
    from tessera.core.processes import skip_final_collection

    try:
        serve(sys.argv[1], sys.argv[2:])
    finally:
        skip_final_collection()  # thousands of modules: seconds of collection at exit, for nothing
