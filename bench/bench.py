"""Latency, throughput and memory of the server, side by side with a floor.

The floor is what the same work costs with no MCP in between: ipykernel
kernels driven directly by jupyter_client (the one in the kernel environment),
started with the same arguments as the server's kernels and reached over IPC
like them. An execution there ends at the iopub `idle` status of the request,
exactly where the server's ends.

Two halves, two interpreters:

    python with `mcp`     bench.py [--quick] [--json PATH] [--bin PATH]
    kernel env's python   bench.py floor --json [--quick]   (kernel starts, plots, parallel)
                          bench.py floor --serve            (warm latency, on request)

The first runs the floor as subprocesses under the kernel environment's
Python (it needs jupyter_client), then drives the release binary over stdio
and streamable HTTP with the official Python MCP SDK. Warm latencies are
measured in interleaved rounds (floor, stdio, HTTP, ...), so that drift on a
shared machine hits the floor and the server alike. It prints a table with
ratios (ours / floor) and targets, and writes every figure and sample to a
JSON file. Use ./bench/bench, which builds, provisions and picks the Pythons.
Not a test: it exits 0 whether or not targets are met.
"""

import argparse
import asyncio
import contextlib
import http.client
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

# ---------------------------------------------------------------------------
# Sizes and limits

# Iterations: full run and --quick (smoke).
FULL = dict(
    kernel_starts=5, graceful_shutdowns=2, new_sessions=10, warm_calls=300, warm_rounds=4, noop_calls=100,
    nagle_calls=20, plot_calls=20, par_sessions=8, par_calls=20, par_reps=3, many_files_calls=100,
    fair_calls=100, flood_lines=300_000, first_calls=5, cold_starts=3, burst_sessions=40,
)  # fmt: skip
QUICK = dict(
    kernel_starts=2, graceful_shutdowns=1, new_sessions=3, warm_calls=40, warm_rounds=2, noop_calls=20,
    nagle_calls=5, plot_calls=5, par_sessions=8, par_calls=5, par_reps=1, many_files_calls=10,
    fair_calls=20, flood_lines=30_000, first_calls=2, cold_starts=1, burst_sessions=16,
)  # fmt: skip
WARMUP_CALLS = 20  # untimed calls before a warm-latency series
CALL_TIMEOUT = 60.0  # one execute_code / one raw execution
FLOOR_TIMEOUT = 480.0  # the floor's one-shot subprocess
OURS_TIMEOUT = 600.0  # everything measured on the servers
FLOOD_TIMEOUT = 300.0  # the flushed-line flood, on either side
LISTEN_TIMEOUT = 60.0  # HTTP server printing its address
SHUTDOWN_TIMEOUT = 15.0  # a server exiting after SIGTERM / stdin closed
POOL_SIZE = 2

KERNEL_ARGS = ["--HistoryManager.enabled=False", "--Application.log_level=WARN"]  # as src/kernel/local.rs
TRIVIAL = "x = 1"
PLOT_IMPORT = "import matplotlib.pyplot as plt"
PLOT = "import matplotlib.pyplot as plt; plt.plot([1,2,3]); plt.savefig('p.png'); plt.show()"
GETPID = "import os; os.getpid()"
BACKEND = "import matplotlib; matplotlib.get_backend()"
MANY_FILES = 5000  # files in the session folder for the change-detection row
# A progress loop / training log: one flushed line per iteration.
FLOOD = "for i in range({n}): print(i, flush=True)"
MAKE_FILES = (
    "import os\nfor d in range(50):\n    os.makedirs(f'many/{d}', exist_ok=True)\n"
    "    for i in range(100):\n        open(f'many/{d}/{i}.txt', 'w').write('x')"
)

# Issue 13: a data user's first call, a cold start, an idle session's memory, bursts.
TEMPLATE_MARKER = b"mcp-python-interpreter-kernel-template"  # as src/kernel/template.rs
STACK_IMPORT = "import pandas, numpy, matplotlib.pyplot"
STACK_CELL = "import pandas, numpy, matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()"
SETTLE_S = 8.0  # "server up for a while": template imported, pool filled
T_FIRST_CALL_S = 0.150
T_COLD_EXTRA_S = 0.2
T_IDLE_USS_KB = 20 * 1024
T_BURST_PER_S = 40.0

# Targets (see the table): ratios are ours / floor.
T_WARM_STDIO_RATIO = 1.0
T_HTTP_EXTRA_S = 0.001
T_NEW_SESSION_RATIO = 0.15
T_PLOT_S = 0.5
T_PARALLEL_CPS = 280.0
T_SERVER_RSS_KB = 30 * 1024
T_FAIR_RATIO = 2.0
T_GATEWAY_RATIO = 2.0
T_FLOOD_S_PER_300K = 10.0
BUSY_PROCESSES = 7
# Keeps BUSY_PROCESSES processes busy until the file `stop` appears (at most 30 s).
BUSY = (
    "import multiprocessing as mp, os, time\n"
    "def burn():\n"
    "    end = time.time() + 30\n"
    "    while time.time() < end and not os.path.exists('stop'):\n"
    "        for _ in range(10000): pass\n"
    f"ps = [mp.Process(target=burn) for _ in range({BUSY_PROCESSES})]\n"
    "for p in ps: p.start()\n"
    "for p in ps: p.join()"
)


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def percentile(xs, q):
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def summary(xs):
    if not xs:
        return None
    return {
        "n": len(xs),
        "p50": statistics.median(xs),
        "p95": percentile(xs, 95),
        "max": max(xs),
        "min": min(xs),
        "mean": statistics.fmean(xs),
    }


def rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, TypeError):
        pass
    return None


def kernel_pid_by_folder(sid):
    """The host pid of the ipykernel whose working folder is session `sid`."""
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
            # Launched, or forked from the kernel template (keeps its command line).
            is_kernel = b"ipykernel_launcher" in cmd or TEMPLATE_MARKER in cmd
            if is_kernel and b"__kernel-sandbox" not in cmd and os.readlink(f"/proc/{p}/cwd").endswith(sid):
                return int(p)
        except OSError:
            pass
    return None


def uss_kb(pid):
    """Unique set size: the Private_* lines of /proc/PID/smaps_rollup (pages
    no other process maps; copy-on-write pages shared with the template are
    not counted until written)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return sum(int(line.split()[1]) for line in f if line.startswith("Private_"))
    except (OSError, TypeError, ValueError):
        return None


def wrapper_of(pid):
    """The kernel's sandbox wrapper (our binary, the init of the kernel's PID
    namespace), or None. Not always its parent: a forked kernel is the
    template's child."""
    try:
        ns = os.readlink(f"/proc/{pid}/ns/pid")
    except (OSError, TypeError):
        return None
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            if os.readlink(f"/proc/{p}/ns/pid_for_children") != ns or int(p) == pid:
                continue
            with open(f"/proc/{p}/cmdline", "rb") as f:
                if b"__kernel-sandbox" in f.read():
                    return int(p)
        except OSError:
            pass
    return None


def session_rss_kb(pid):
    """RSS of a kernel plus, when it runs in a PID namespace, its sandbox
    wrapper (the namespace's init, our binary): what a session costs."""
    kb = rss_kb(pid)
    wrapper = wrapper_of(pid)
    if kb is not None and wrapper:
        kb += rss_kb(wrapper) or 0
    return kb


def kernel_rss(pids):
    values = [v for v in (session_rss_kb(p) for p in pids) if v is not None]
    if not values:
        return None
    return {"n": len(values), "mean_kb": statistics.fmean(values), "max_kb": max(values), "sum_kb": sum(values)}


def median_rep(reps):
    """Of repeated parallel runs, the one with the median calls/s (all kept)."""
    best = sorted(reps, key=lambda r: r["calls_per_s"])[len(reps) // 2]
    return {**best, "reps_calls_per_s": [r["calls_per_s"] for r in reps]}


def cpu_s(pid):
    """User + system CPU seconds of a process so far (None if unknown)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, TypeError, IndexError, ValueError):
        return None


def cpu_sum(pids):
    values = [cpu_s(p) for p in pids]
    return None if any(v is None for v in values) else sum(values)


def cpu_delta(before, after, calls):
    """Microseconds of CPU per call between two readings."""
    if before is None or after is None or not calls:
        return None
    return (after - before) / calls * 1e6


def raise_on_sigterm():
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def die_with_parent():
    """In a child before exec: SIGTERM it when the bench dies (even by SIGKILL),
    so that no server or floor outlives a killed run."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class LineChannel:
    """JSON lines over a child's stdin/stdout, every read bounded in time."""

    def __init__(self, proc):
        self.proc = proc
        self.buf = b""

    def send(self, obj):
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")
        self.proc.stdin.flush()

    def recv(self, timeout=CALL_TIMEOUT):
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line.strip():
                    return json.loads(line)
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError(f"no answer from pid {self.proc.pid} within {timeout} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"pid {self.proc.pid} closed its stdout (exit {self.proc.poll()})")
            self.buf += chunk

    def close(self):
        """Close stdin (the child's cue to exit), then wait, then kill."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------
# The floor: raw jupyter_client, no MCP (runs under the kernel env's Python)


class RawKernel:
    """One ipykernel with a BlockingKernelClient, launched like the server's
    kernels (same arguments, IPC sockets in a private folder, cwd its own)."""

    def __init__(self, workdir):
        from jupyter_client import KernelManager

        self.dir = tempfile.mkdtemp(prefix="k-", dir=workdir)
        self.km = KernelManager(kernel_name="python3", transport="ipc")
        self.km.connection_file = os.path.join(self.dir, "kernel.json")
        self.km.ip = os.path.join(self.dir, "ipc")
        self.kc = None
        self.km.start_kernel(extra_arguments=KERNEL_ARGS, cwd=self.dir)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=CALL_TIMEOUT)

    def run(self, code, timeout=CALL_TIMEOUT):
        """Execute; return (seconds to the request's iopub idle, outputs).
        The shell reply is collected afterwards, outside the timed span."""
        kc = self.kc
        t0 = time.perf_counter()
        msg_id = kc.execute(code, allow_stdin=False)
        deadline = t0 + timeout
        outputs = []
        while True:
            msg = kc.get_iopub_msg(timeout=max(0.0, deadline - time.perf_counter()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "status" and msg["content"]["execution_state"] == "idle":
                break
            if kind in ("stream", "display_data", "execute_result", "error"):
                outputs.append((kind, msg["content"]))
        elapsed = time.perf_counter() - t0
        while True:
            reply = kc.get_shell_msg(timeout=CALL_TIMEOUT)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        if reply["content"].get("status") != "ok":
            raise RuntimeError(f"raw kernel: {code!r} failed: {outputs}")
        return elapsed, outputs

    def value(self, code):
        _, outputs = self.run(code)
        for kind, content in outputs:
            if kind == "execute_result":
                return content["data"]["text/plain"]
        raise RuntimeError(f"raw kernel: no result for {code!r}: {outputs}")

    def close(self, graceful=False):
        """Kill the kernel (graceful: shutdown_request, wait for it to exit)."""
        try:
            if self.kc is not None:
                self.kc.stop_channels()
        finally:
            try:
                self.km.shutdown_kernel(now=not graceful)
            except Exception as e:  # noqa: BLE001 - best effort, keep cleaning up
                print(f"floor: shutting a kernel down: {e!r}", file=sys.stderr)
            shutil.rmtree(self.dir, ignore_errors=True)


def floor_block(k, count, start):
    """`count` x `x = 1`, then `count` x `print(i)`; seconds of each."""
    trivial = [k.run(TRIVIAL)[0] for _ in range(count)]
    printed = []
    for i in range(start, start + count):
        t, outputs = k.run(f"print({i})")
        if "".join(c["text"] for kind, c in outputs if kind == "stream") != f"{i}\n":
            raise RuntimeError(f"raw kernel: print({i}) gave {outputs}")
        printed.append(t)
    return trivial, printed


def floor_serve():
    """One warm kernel; answers `{"count", "start"}` lines with a timed block,
    until stdin closes. Lets the caller interleave the floor with the server."""
    raise_on_sigterm()
    os.environ.pop("MPLBACKEND", None)
    workdir = tempfile.mkdtemp(prefix="bench-floor-")
    k = None
    try:
        k = RawKernel(workdir)
        for _ in range(WARMUP_CALLS):
            k.run(TRIVIAL)
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            cmd = json.loads(line)
            trivial, printed = floor_block(k, cmd["count"], cmd["start"])
            print(json.dumps({"trivial": trivial, "print": printed}), flush=True)
    finally:
        if k is not None:
            k.close()
        shutil.rmtree(workdir, ignore_errors=True)


def floor_main(quick):
    """Kernel starts and graceful shutdowns, kernel RSS, plots, parallel."""
    raise_on_sigterm()
    os.environ.pop("MPLBACKEND", None)  # ipykernel then picks the inline backend, as in the server
    n = QUICK if quick else FULL
    workdir = tempfile.mkdtemp(prefix="bench-floor-")
    kernels = []
    out = {}
    try:
        # Kernel start until ready (one untimed warm-up start first); the first
        # timed ones also get a timed graceful shutdown, the floor of
        # clear_session (jupyter_client's shutdown_kernel: request, wait, kill).
        starts, shutdowns = [], []
        for i in range(n["kernel_starts"] + 1):
            t0 = time.perf_counter()
            k = RawKernel(workdir)
            t = time.perf_counter() - t0
            k.run(TRIVIAL)
            graceful = 1 <= i <= n["graceful_shutdowns"]
            t0 = time.perf_counter()
            k.close(graceful)
            if graceful:
                shutdowns.append(time.perf_counter() - t0)
            if i:
                starts.append(t)
        out["kernel_start_s"], out["graceful_shutdown_s"] = starts, shutdowns

        # Kernel RSS after some calls, then the plot.
        k = RawKernel(workdir)
        kernels.append(k)
        pid = int(k.value(GETPID))
        for _ in range(WARMUP_CALLS):
            k.run(TRIVIAL)
        out["kernel_rss_1"] = kernel_rss([pid])
        k.run(PLOT_IMPORT)
        out["matplotlib_backend"] = k.value(BACKEND).strip("'")
        plots = []
        for _ in range(n["plot_calls"]):
            t, outputs = k.run(PLOT)
            if not any(kind == "display_data" and "image/png" in c["data"] for kind, c in outputs):
                raise RuntimeError(f"raw kernel: the plot showed no PNG: {outputs}")
            plots.append(t)
        out["plot_s"] = plots

        # The flushed-line flood: time to idle, and how much of it arrived (a
        # raw kernel's PUB socket drops what is beyond its high-water mark).
        lines = n["flood_lines"]
        t, outputs = k.run(FLOOD.format(n=lines), timeout=FLOOD_TIMEOUT)
        text = "".join(c["text"] for kind, c in outputs if kind == "stream")
        out["flood"] = {"lines": lines, "seconds": t, "messages": len(outputs), "lines_received": text.count("\n")}
        kernels.remove(k)
        k.close()

        # N fresh kernels (like the server's new sessions), one thread each
        # driving its own client.
        while len(kernels) < n["par_sessions"]:
            kernels.append(RawKernel(workdir))
        pids = [int(k.value(GETPID)) for k in kernels]
        for k in kernels:
            k.run(TRIVIAL)
        errors = []

        def worker(k):
            try:
                for _ in range(n["par_calls"]):
                    k.run(TRIVIAL)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

        reps = []
        for _ in range(n["par_reps"]):
            threads = [threading.Thread(target=worker, args=(k,)) for k in kernels]
            k_cpu, c_cpu = cpu_sum(pids), time.process_time()
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join(FLOOR_TIMEOUT)
            elapsed = time.perf_counter() - t0
            if errors or any(t.is_alive() for t in threads):
                raise RuntimeError(f"raw parallel run failed: {errors}")
            calls = n["par_sessions"] * n["par_calls"]
            reps.append({
                "sessions": n["par_sessions"], "calls": calls, "seconds": elapsed, "calls_per_s": calls / elapsed,
                "kernels_cpu_us_per_call": cpu_delta(k_cpu, cpu_sum(pids), calls),
                "client_cpu_us_per_call": cpu_delta(c_cpu, time.process_time(), calls),
            })  # fmt: skip
        out["parallel"] = median_rep(reps)
        out["kernel_rss_n"] = kernel_rss(pids)
    finally:
        for k in kernels:
            k.close()
        shutil.rmtree(workdir, ignore_errors=True)
    import ipykernel
    import jupyter_client

    out["versions"] = {
        "python": sys.version.split()[0], "jupyter_client": jupyter_client.__version__,
        "ipykernel": ipykernel.__version__,
    }  # fmt: skip
    return out


def run_floor(kernel_python, quick):
    """The floor's one-shot half; bounded, SIGTERM first so that it shuts its
    kernels down."""
    cmd = [kernel_python, os.path.abspath(__file__), "floor", "--json"] + (["--quick"] if quick else [])
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        preexec_fn=die_with_parent,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=FLOOR_TIMEOUT)
    except BaseException:
        proc.terminate()
        try:
            proc.communicate(timeout=SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"floor run failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    return json.loads(stdout)


class FloorServer:
    """`bench.py floor --serve` as a child: one warm raw kernel on request.
    Spawn it from the main thread (PR_SET_PDEATHSIG follows the spawning
    thread), then wait_ready() may block in a worker thread."""

    def __init__(self, kernel_python):
        self.err = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(
            [kernel_python, os.path.abspath(__file__), "floor", "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, preexec_fn=die_with_parent,
        )  # fmt: skip
        self.chan = LineChannel(proc)

    def wait_ready(self):
        try:
            self.chan.recv(timeout=LISTEN_TIMEOUT)
        except (OSError, RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"floor server: {e}; stderr:\n{self.tail()}") from None

    def block(self, count, start):
        try:
            self.chan.send({"count": count, "start": start})
            r = self.chan.recv(timeout=CALL_TIMEOUT + count * 2)
        except (OSError, RuntimeError, TimeoutError) as e:
            raise RuntimeError(f"floor server: {e}; stderr:\n{self.tail()}") from None
        return r["trivial"], r["print"]

    def tail(self):
        self.err.seek(0)
        return "".join(self.err.readlines()[-30:])

    def close(self):
        self.chan.close()
        self.err.close()


# ---------------------------------------------------------------------------
# Ours: the server through the official MCP SDK (runs under E2E_PYTHON)

LISTEN_RE = re.compile(r"listening on (http://127\.0\.0\.1:(\d+)/mcp)")
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SERVER_VARS = (
    "MCP_TRANSPORT", "MCP_HOST", "MCP_PORT", "MCP_DATA_DIR", "MCP_PYTHON", "MCP_SESSION_TIMEOUT",
    "MCP_CLEANUP_INTERVAL", "MCP_EXECUTION_TIMEOUT", "MCP_MAX_SESSIONS", "MCP_AUTH_TOKEN", "MCP_TOKENS_FILE",
    "LOG_LEVEL", "MPLBACKEND",
)  # fmt: skip


def server_env():
    """Our environment without the server's own settings: only flags apply."""
    return {k: v for k, v in os.environ.items() if k not in SERVER_VARS and not k.startswith("MCP_POOL")}


class HttpServer:
    """The server on streamable HTTP, stderr drained by a thread."""

    def __init__(self, binary, data_dir):
        self.proc = subprocess.Popen(
            [binary, "--transport", "http", "--host", "127.0.0.1", "--port", "0", "--data-dir", data_dir],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=server_env(),
            preexec_fn=die_with_parent,
        )  # fmt: skip
        self.lines = []
        self.url = None
        self._found = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._found.wait(LISTEN_TIMEOUT) or self.url is None:
            self.stop()
            raise RuntimeError(f"HTTP server did not print its address; stderr:\n{self.tail()}")

    def _drain(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.lines.append(line)
            m = LISTEN_RE.search(ANSI_RE.sub("", line))
            if m and self.url is None:
                self.url = m.group(1)
                self._found.set()
        self._found.set()

    def tail(self, n=30):
        return "".join(self.lines[-n:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=SHUTDOWN_TIMEOUT)


def find_server_pid(binary, data_dir):
    """The stdio server the SDK spawned: pgrep on the unique data dir, keeping
    only the process that is our binary (kernels may mention the folder too)."""
    out = subprocess.run(["pgrep", "-f", "--", data_dir], capture_output=True, text=True).stdout
    for pid in (int(p) for p in out.split()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv0 = f.read().split(b"\0")[0].decode()
        except OSError:
            continue
        if os.path.basename(argv0) == os.path.basename(binary):
            return pid
    return None


def output_text(s):
    """`output` is a list of text pieces (older servers: one string)."""
    out = s.get("output")
    return "".join(out) if isinstance(out, list) else out


def leaf_exception(e):
    """The SDK's task groups wrap an error in single-member exception groups."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return e


class Ours:
    """One connected SDK client plus helpers that time calls. `pid` is the
    server's, for CPU and RSS readings."""

    def __init__(self, client, pid):
        self.c = client
        self.pid = pid
        self.cpu = {"server_s": 0.0, "client_s": 0.0, "calls": 0}

    async def call(self, code, sid):
        t0 = time.perf_counter()
        r = await self.c.call_tool("execute_code", {"code": code, "session_id": sid}, read_timeout_seconds=CALL_TIMEOUT)
        t = time.perf_counter() - t0
        s = r.structured_content
        if not isinstance(s, dict) or not s.get("success"):
            raise RuntimeError(f"execute_code {code!r} failed: {s if s is not None else r}")
        return t, s

    async def new(self, code=TRIVIAL):
        _, s = await self.call(code, "")
        return s["session_id"]

    async def clear(self, sid):
        await self.c.call_tool("clear_session", {"session_id": sid}, read_timeout_seconds=CALL_TIMEOUT)

    async def kernel_pid(self, sid):
        # A kernel in a PID namespace of its own does not know its host pid:
        # find it by its working folder (the session's).
        await self.call(TRIVIAL, sid)
        return kernel_pid_by_folder(sid)

    async def new_sessions(self, n, pause=0.0):
        """Seconds of each new session's first call, and of each clear_session."""
        out, clears = [], []
        for i in range(n + 1):  # the first one is an untimed warm-up
            if pause:
                await asyncio.sleep(pause)
            t, s = await self.call(TRIVIAL, "")
            t0 = time.perf_counter()
            await self.clear(s["session_id"])
            if i:
                out.append(t)
                clears.append(time.perf_counter() - t0)
        return out, clears

    async def block(self, sid, count, start):
        """Like floor_block, through MCP; adds up server and client CPU."""
        s_cpu, c_cpu = cpu_s(self.pid), time.process_time()
        trivial = [(await self.call(TRIVIAL, sid))[0] for _ in range(count)]
        printed = []
        for i in range(start, start + count):
            t, s = await self.call(f"print({i})", sid)
            if output_text(s) != f"{i}\n":
                raise RuntimeError(f"print({i}) gave {s.get('output')!r}")
            printed.append(t)
        after = cpu_s(self.pid)
        if s_cpu is not None and after is not None:
            self.cpu["server_s"] += after - s_cpu
        self.cpu["client_s"] += time.process_time() - c_cpu
        self.cpu["calls"] += 2 * count
        return trivial, printed

    async def flood(self, sid, lines):
        """The flushed-line flood; checks that the output ends with its last line."""
        code = FLOOD.format(n=lines)
        args = {"code": code, "session_id": sid, "timeout": FLOOD_TIMEOUT}
        t0 = time.perf_counter()
        r = await self.c.call_tool("execute_code", args, read_timeout_seconds=FLOOD_TIMEOUT + 30)
        t = time.perf_counter() - t0
        s = r.structured_content
        if not isinstance(s, dict) or not s.get("success"):
            raise RuntimeError(f"the flood failed: {s if s is not None else r}")
        text = "".join(o for o in s["output"] if not o.startswith("File created: "))
        if not text.endswith(f"\n{lines - 2}\n{lines - 1}\n"):
            raise RuntimeError(f"the flood's output lost its tail: {text[-300:]!r}")
        return {"lines": lines, "seconds": t}

    async def noop(self, sid, n):
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            await self.c.call_tool("list_session_files", {"session_id": sid}, read_timeout_seconds=CALL_TIMEOUT)
            out.append(time.perf_counter() - t0)
        return out

    async def plot(self, sid, n):
        await self.call(PLOT_IMPORT, sid)
        _, s = await self.call(BACKEND, sid)
        backend = (s.get("result") or "").strip("'")
        out = []
        for _ in range(n):
            t, s = await self.call(PLOT, sid)
            if not any(f.get("mime_type") == "image/png" for f in s.get("files") or []):
                raise RuntimeError(f"the plot listed no PNG: {s}")
            out.append(t)
        return out, backend

    async def parallel(self, n_sessions, n_calls, n_reps):
        """n_sessions new sessions, then n_calls trivial calls each, all at once
        (n_reps times, the median kept). Returns the figures with RSS taken
        while the sessions live; clears them."""
        sids = await asyncio.gather(*(self.new() for _ in range(n_sessions)))
        try:
            pids = await asyncio.gather(*(self.kernel_pid(s) for s in sids))

            async def worker(sid):
                for _ in range(n_calls):
                    await self.call(TRIVIAL, sid)

            reps = []
            for _ in range(n_reps):
                s_cpu, k_cpu, c_cpu = cpu_s(self.pid), cpu_sum(pids), time.process_time()
                t0 = time.perf_counter()
                await asyncio.gather(*(worker(s) for s in sids))
                elapsed = time.perf_counter() - t0
                calls = n_sessions * n_calls
                reps.append({
                    "sessions": n_sessions, "calls": calls, "seconds": elapsed, "calls_per_s": calls / elapsed,
                    "server_cpu_us_per_call": cpu_delta(s_cpu, cpu_s(self.pid), calls),
                    "kernels_cpu_us_per_call": cpu_delta(k_cpu, cpu_sum(pids), calls),
                    "client_cpu_us_per_call": cpu_delta(c_cpu, time.process_time(), calls),
                })  # fmt: skip
            return {**median_rep(reps), "server_rss_kb": rss_kb(self.pid), "kernel_rss": kernel_rss(pids)}
        finally:
            await asyncio.gather(*(self.clear(s) for s in sids))


class ThinClient:
    """A minimal MCP client (hand-written JSON-RPC, no SDK), to tell the
    server's own cost from the Python SDK's. Subclasses move the bytes."""

    PROTOCOL = "2025-06-18"

    def __init__(self):
        self.next_id = 0
        self.sid = None
        self.request("initialize", {"protocolVersion": self.PROTOCOL, "capabilities": {},
                                    "clientInfo": {"name": "bench-thin", "version": "0"}})  # fmt: skip
        self.notify("notifications/initialized")

    def request(self, method, params):
        self.next_id += 1
        msg = self.exchange({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}, self.next_id)
        if "error" in msg:
            raise RuntimeError(f"{method}: {msg['error']}")
        return msg["result"]

    def notify(self, method):
        self.exchange({"jsonrpc": "2.0", "method": method}, None)

    def execute(self, code, sid):
        t0 = time.perf_counter()
        r = self.request("tools/call", {"name": "execute_code", "arguments": {"code": code, "session_id": sid}})
        t = time.perf_counter() - t0
        s = r.get("structuredContent") or {}
        if not s.get("success"):
            raise RuntimeError(f"thin client: execute_code {code!r} failed: {r}")
        return t, s

    def open_session(self):
        _, s = self.execute(TRIVIAL, "")
        self.sid = s["session_id"]
        for _ in range(WARMUP_CALLS):
            self.execute(TRIVIAL, self.sid)

    def block(self, count):
        return [self.execute(TRIVIAL, self.sid)[0] for _ in range(count)]

    def clear(self):
        if self.sid:
            self.request("tools/call", {"name": "clear_session", "arguments": {"session_id": self.sid}})
            self.sid = None


class ThinStdio(ThinClient):
    """Its own stdio server (stdin closing is its cue to exit)."""

    def __init__(self, binary, data_dir):
        self.err = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen(
            [binary, "--transport", "stdio", "--data-dir", data_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=server_env(),
        )  # fmt: skip
        self.chan = LineChannel(proc)
        try:
            super().__init__()
        except BaseException:
            self.close()
            raise

    def exchange(self, obj, want_id):
        self.chan.send(obj)
        while want_id is not None:
            msg = self.chan.recv()
            if msg.get("id") == want_id:
                return msg

    def close(self):
        self.chan.close()
        self.err.close()


class NoDelayConnection(http.client.HTTPConnection):
    """http.client sends headers and body in two writes: without TCP_NODELAY,
    Nagle plus the server's delayed ACK would add 40 ms to every request."""

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ThinHttp(ThinClient):
    """One keep-alive connection; SSE answers are read whole (the server ends
    the stream after the response). quickack: ACK the response headers at
    once, so that a server writing with Nagle's algorithm on does not hold the
    body back until our delayed ACK (~40 ms)."""

    def __init__(self, url, quickack):
        u = urllib.parse.urlsplit(url)
        self.conn = NoDelayConnection(u.hostname, u.port, timeout=CALL_TIMEOUT)
        self.path = u.path
        self.quickack = quickack
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        super().__init__()

    def exchange(self, obj, want_id):
        self.conn.request("POST", self.path, json.dumps(obj).encode(), self.headers)
        if self.quickack:
            self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.status >= 300:
            raise RuntimeError(f"thin HTTP client: {resp.status} {body[:200]!r}")
        if sid := resp.getheader("mcp-session-id"):
            self.headers["Mcp-Session-Id"] = sid
            self.headers["MCP-Protocol-Version"] = self.PROTOCOL
        if want_id is None:
            return None
        if resp.getheader("content-type", "").startswith("text/event-stream"):
            payloads = [ln[5:].strip() for ln in body.splitlines() if ln.startswith(b"data:")]
        else:
            payloads = [body]
        for p in payloads:
            if p:
                msg = json.loads(p)
                if msg.get("id") == want_id:
                    return msg
        raise RuntimeError(f"thin HTTP client: no response with id {want_id}: {body[:300]!r}")

    def close(self):
        try:
            self.conn.request("DELETE", self.path, headers=self.headers)
            self.conn.getresponse().read()
        except (OSError, http.client.HTTPException):
            pass
        self.conn.close()


def make_client(target):
    from mcp import Client

    return Client(target, read_timeout_seconds=CALL_TIMEOUT, cache=None)


def temp_dir(stack, prefix):
    d = tempfile.mkdtemp(prefix=prefix)
    stack.callback(shutil.rmtree, d, ignore_errors=True)
    return d


async def sdk_stdio(stack, binary, errlog, extra=()):
    """An SDK client on a fresh stdio server, its stderr going to errlog."""
    from mcp import StdioServerParameters
    from mcp.client.stdio import stdio_client

    data_dir = temp_dir(stack, "bench-stdio-")
    params = StdioServerParameters(
        command=binary, args=["--transport", "stdio", "--data-dir", data_dir, *extra], env=server_env()
    )
    client = await stack.enter_async_context(make_client(stdio_client(params, errlog=errlog)))
    pid = find_server_pid(binary, data_dir)
    if pid is None:
        log("warning: stdio server pid not found: no server RSS/CPU figures")
    ours = Ours(client, pid)
    ours.data_dir = data_dir
    return ours


GATEWAY_PYTHON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "target", "gateway-venv", "bin", "python")  # fmt: skip


class KernelGateway:
    """A Jupyter Kernel Gateway on loopback (the venv scripts/gateway-venv.sh
    makes), its kernels running the kernel environment: the remote backend's
    row. Output rate limits off, as the README tells deployments."""

    def __init__(self, stack, kernel_python):
        spec = temp_dir(stack, "bench-gw-spec-")
        os.makedirs(os.path.join(spec, "kernels", "python3"))
        with open(os.path.join(spec, "kernels", "python3", "kernel.json"), "w") as f:
            json.dump({"argv": [kernel_python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                       "display_name": "bench", "language": "python"}, f)  # fmt: skip
        root = temp_dir(stack, "bench-gw-root-")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.token = "bench" + os.urandom(8).hex()
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, JUPYTER_PATH=spec, JUPYTER_DATA_DIR=os.path.join(spec, "data"),
                   JUPYTER_CONFIG_DIR=os.path.join(spec, "config"))  # fmt: skip
        self.proc = subprocess.Popen(
            [GATEWAY_PYTHON, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1",
             f"--KernelGatewayApp.port={port}", f"--KernelGatewayApp.auth_token={self.token}",
             "--ZMQChannelsWebsocketConnection.limit_rate=False"],
            cwd=root, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )  # fmt: skip
        stack.callback(self.stop)
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/api/kernelspecs", headers={"Authorization": f"token {self.token}"})
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the Kernel Gateway did not start")

    def args(self):
        return ["--kernel-gateway", self.url, "--gateway-token", self.token]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def file_tail(f, n=30):
    def tail():
        f.seek(0)
        return "".join(f.readlines()[-n:])

    return tail


@contextlib.contextmanager
def stderr_tails_on_error():
    """Yields a list to register (name, tail function) pairs in; on an error,
    shows each server's stderr tail, after the servers have been stopped."""
    logs = []
    try:
        yield logs
    except BaseException:
        for name, tail in logs:
            with contextlib.suppress(Exception):
                log(f"{name} stderr (tail):\n{tail()}")
        raise


async def thread(fn, *args):
    return await asyncio.to_thread(fn, *args)


async def measure_ours(binary, kernel_python, n, pool, pause):
    """Everything on the servers. Returns {"stdio": ..., "http": ..., maybe "stdio_pool": ...,
    "floor_warm": ...}."""
    res = {"stdio": {}, "http": {}}
    st, ht = res["stdio"], res["http"]
    with tempfile.TemporaryFile("w+") as errlog, stderr_tails_on_error() as logs:
        async with contextlib.AsyncExitStack() as stack:
            await measure_main(stack, logs, errlog, res, st, ht, binary, kernel_python, n)

    for mode, extra in (("fork", ()), ("launch", ("--no-fork",))):
        with tempfile.TemporaryFile("w+") as errlog, stderr_tails_on_error() as logs:
            async with contextlib.AsyncExitStack() as stack:
                log(f"data user, default flags{' + ' + ' '.join(extra) if extra else ''}: first calls, cold starts, burst")
                logs.append((f"{mode} server", file_tail(errlog)))
                res[f"stack_{mode}"] = await measure_stack(stack, binary, kernel_python, errlog, extra, n)

    if pool:
        with tempfile.TemporaryFile("w+") as errlog, stderr_tails_on_error() as logs:
            async with contextlib.AsyncExitStack() as stack:
                log(f"stdio server with --pool-size {POOL_SIZE}: new sessions, {pause:.1f} s pause before each")
                logs.append(("pooled stdio server", file_tail(errlog)))
                pooled = await sdk_stdio(stack, binary, errlog, ["--pool-size", str(POOL_SIZE)])
                new, clears = await pooled.new_sessions(n["new_sessions"], pause=pause)
                res["stdio_pool"] = {"new_session_s": new, "clear_session_s": clears}
    return res


def bare_import_s(kernel_python):
    """`python -c 'import pandas, numpy, matplotlib.pyplot'`: the floor of a cold start."""
    t0 = time.perf_counter()
    subprocess.run([kernel_python, "-c", STACK_IMPORT], check=True, env=server_env(), timeout=FLOOR_TIMEOUT)
    return time.perf_counter() - t0


async def measure_stack(stack, binary, kernel_python, errlog, extra, n):
    """Issue 13's rows for one way of starting kernels (default flags plus `extra`)."""
    out = {"first_call_s": [], "idle_uss_kb": [], "idle_session_uss_kb": [], "cold_first_call_s": [],
           "bare_import_s": []}  # fmt: skip
    # A cold start: the server's process started, its first call answered;
    # interleaved with the bare import, so drift hits both alike.
    for _ in range(n["cold_starts"]):
        out["bare_import_s"].append(await thread(bare_import_s, kernel_python))
        async with contextlib.AsyncExitStack() as cold:
            t0 = time.perf_counter()
            ours = await sdk_stdio(cold, binary, errlog, extra)
            t, s = await ours.call(STACK_CELL, "")
            out["cold_first_call_s"].append(time.perf_counter() - t0)
            check_png(s)
    ours = await sdk_stdio(stack, binary, errlog, extra)
    for _ in range(n["first_calls"]):
        await asyncio.sleep(SETTLE_S)
        t, s = await ours.call(STACK_CELL, "")
        check_png(s)
        out["first_call_s"].append(t)
        pid = await ours.kernel_pid(s["session_id"])
        out["idle_uss_kb"].append(uss_kb(pid))
        wrapper = wrapper_of(pid)
        out["idle_session_uss_kb"].append((uss_kb(pid) or 0) + (uss_kb(wrapper) or 0))
        out.setdefault("forked", []).append(kernel_is_forked(pid))
        await ours.clear(s["session_id"])
    # A burst beyond the pool: sessions asked for as fast as 8 clients can.
    await asyncio.sleep(SETTLE_S)
    sem = asyncio.Semaphore(8)

    async def one():
        async with sem:
            return await ours.new()

    t0 = time.perf_counter()
    sids = await asyncio.gather(*(one() for _ in range(n["burst_sessions"])))
    out["burst"] = {"sessions": len(sids), "seconds": time.perf_counter() - t0}
    await asyncio.gather(*(ours.clear(sid) for sid in sids))
    return out


def check_png(s):
    if not any(f.get("mime_type") == "image/png" for f in s.get("files") or []):
        raise RuntimeError(f"the plot listed no PNG: {s}")


def kernel_is_forked(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return TEMPLATE_MARKER in f.read()
    except (OSError, TypeError):
        return None


async def measure_main(stack, logs, errlog, res, st, ht, binary, kernel_python, n):
    """The stdio and HTTP servers, thin clients and the warm floor kernel."""
    log("stdio server (SDK client)")
    logs.append(("stdio server", file_tail(errlog)))
    stdio = await sdk_stdio(stack, binary, errlog)
    log(f"  {n['new_sessions']} new sessions")
    st["new_session_s"], st["clear_session_s"] = await stdio.new_sessions(n["new_sessions"])

    log("HTTP server (SDK client), thin clients, floor kernel")
    http_server = HttpServer(binary, temp_dir(stack, "bench-http-"))
    stack.callback(http_server.stop)
    logs.append(("HTTP server", http_server.tail))
    http = Ours(await stack.enter_async_context(make_client(http_server.url)), http_server.proc.pid)
    floor = FloorServer(kernel_python)
    stack.callback(floor.close)
    await thread(floor.wait_ready)
    thin_s = await thread(ThinStdio, binary, temp_dir(stack, "bench-thin-"))
    stack.callback(thin_s.close)
    thin_h = await thread(ThinHttp, http_server.url, True)
    stack.callback(thin_h.close)

    gw, sid_g = None, None
    gt = res["gateway"] = {"warm_trivial_s": [], "warm_print_s": []}
    if os.path.exists(GATEWAY_PYTHON):
        log("stdio server with its kernels on a Jupyter Kernel Gateway")
        gateway = await thread(KernelGateway, stack, kernel_python)
        gw = await sdk_stdio(stack, binary, errlog, gateway.args())
        sid_g = await gw.new()
    else:
        log(f"no {GATEWAY_PYTHON} (scripts/gateway-venv.sh makes it): no gateway row")

    sid_s, sid_h = await stdio.new(), await http.new()
    kpid = await stdio.kernel_pid(sid_s)
    for _ in range(WARMUP_CALLS):
        await stdio.call(TRIVIAL, sid_s)
        await http.call(TRIVIAL, sid_h)
        if gw:
            await gw.call(TRIVIAL, sid_g)
    await thread(thin_s.open_session)
    await thread(thin_h.open_session)

    # Warm latency: interleaved rounds, the order rotating each round.
    count = math.ceil(n["warm_calls"] / n["warm_rounds"])
    log(f"  warm calls: {n['warm_rounds']} interleaved rounds of {count} per code and client")
    fw = res["floor_warm"] = {"warm_trivial_s": [], "warm_print_s": []}
    for key in ("warm_trivial_s", "warm_print_s"):
        st[key], ht[key] = [], []
    st["thin_warm_trivial_s"], ht["thin_warm_trivial_s"] = [], []

    async def floor_part(start):
        t, p = await thread(floor.block, count, start)
        fw["warm_trivial_s"] += t
        fw["warm_print_s"] += p

    async def sdk_part(ours, sid, out, start):
        t, p = await ours.block(sid, count, start)
        out["warm_trivial_s"] += t
        out["warm_print_s"] += p

    async def thin_part(thin, out, start):
        out["thin_warm_trivial_s"] += await thread(thin.block, count)

    for r in range(n["warm_rounds"]):
        start = r * count
        parts = [
            lambda: floor_part(start), lambda: sdk_part(stdio, sid_s, st, start),
            lambda: sdk_part(http, sid_h, ht, start), lambda: thin_part(thin_s, st, start),
            lambda: thin_part(thin_h, ht, start),
        ] + ([lambda: sdk_part(gw, sid_g, gt, start)] if gw else [])  # fmt: skip
        for part in parts[r % len(parts) :] + parts[: r % len(parts)]:
            await part()
    for ours, out in ((stdio, st), (http, ht)):
        server_s = ours.cpu["server_s"] if ours.pid is not None else None
        out["warm_server_cpu_us_per_call"] = cpu_delta(0, server_s, ours.cpu["calls"])
        out["warm_client_cpu_us_per_call"] = cpu_delta(0, ours.cpu["client_s"], ours.cpu["calls"])

    # Done with the thin clients and the floor: one SDK session per server now.
    await thread(thin_h.clear)
    await thread(thin_s.clear)
    await thread(thin_s.close)
    await thread(floor.close)
    st["server_rss_kb_1"], ht["server_rss_kb_1"] = rss_kb(stdio.pid), rss_kb(http.pid)
    st["kernel_rss_1"] = kernel_rss([kpid])

    log("  list_session_files (no kernel) and the thin HTTP client without TCP_QUICKACK")
    st["noop_s"], ht["noop_s"] = await stdio.noop(sid_s, n["noop_calls"]), await http.noop(sid_h, n["noop_calls"])
    nagle = await thread(ThinHttp, http_server.url, False)
    stack.callback(nagle.close)
    await thread(nagle.open_session)
    ht["thin_noquickack_warm_trivial_s"] = await thread(nagle.block, n["nagle_calls"])
    await thread(nagle.clear)

    log(f"  {n['plot_calls']} plots (stdio)")
    st["plot_s"], st["matplotlib_backend"] = await stdio.plot(sid_s, n["plot_calls"])

    log(f"  {n['flood_lines']} flushed lines in one cell (stdio)")
    st["flood"] = await stdio.flood(sid_s, n["flood_lines"])

    log(f"  CPU fairness: warm calls while another session runs {BUSY_PROCESSES} busy processes (stdio)")
    busy = await stdio.new()
    st["fair_idle_s"] = [(await stdio.call(TRIVIAL, sid_s))[0] for _ in range(n["fair_calls"])]
    burner = asyncio.create_task(stdio.call(BUSY, busy))
    await asyncio.sleep(1.0)  # the busy processes are running
    st["fair_loaded_s"] = [(await stdio.call(TRIVIAL, sid_s))[0] for _ in range(n["fair_calls"])]
    open(os.path.join(stdio.data_dir, busy, "stop"), "w").close()  # the busy processes end
    await burner
    await stdio.clear(busy)

    log(f"  {n['many_files_calls']} warm calls with {MANY_FILES} files in the session folder (stdio)")
    await stdio.call(MAKE_FILES, sid_s)
    st["many_files_trivial_s"] = [(await stdio.call(TRIVIAL, sid_s))[0] for _ in range(n["many_files_calls"])]
    await stdio.clear(sid_s)
    await http.clear(sid_h)

    for name, ours, out in (("stdio", stdio, st), ("HTTP", http, ht)):
        log(f"  {n['par_sessions']} sessions x {n['par_calls']} calls in parallel, {n['par_reps']} times ({name})")
        out["parallel"] = await ours.parallel(n["par_sessions"], n["par_calls"], n["par_reps"])



async def run_ours(binary, kernel_python, n, pool, pause):
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    return await asyncio.wait_for(measure_ours(binary, kernel_python, n, pool, pause), OURS_TIMEOUT)


# ---------------------------------------------------------------------------
# Report


def build_rows(floor, ours, pool_pause):
    rows = []

    def row(metric, transport, unit, mine, base=None, target=None, ok=None, note=None):
        ratio = mine / base if mine is not None and base else None
        rows.append(
            {"metric": metric, "transport": transport, "unit": unit, "ours": mine, "floor": base,
             "ratio": ratio, "target": target, "pass": ok, "note": note}
        )  # fmt: skip

    st, ht = ours["stdio"], ours["http"]
    fs = summary(floor["kernel_start_s"])
    labels = (("stdio", "new session, back-to-back"), ("stdio_pool", f"new session, --pool-size {POOL_SIZE}, paced"))
    for key, label in labels:
        if key not in ours:
            continue
        s = summary(ours[key]["new_session_s"])
        note = f"a {pool_pause:.1f} s pause before each (pool refill)" if key == "stdio_pool" else None
        note = note or ("default flags; each new session right after the previous one's clear_session, so the "
                        "pool is drained faster than kernels start; floor: raw kernel start until ready "
                        "(KernelManager.start_kernel + wait_for_ready)")  # fmt: skip
        row(f"{label} p50", "stdio", "s", s["p50"], fs["p50"], f"<= {T_NEW_SESSION_RATIO}x floor",
            s["p50"] <= T_NEW_SESSION_RATIO * fs["p50"], note)  # fmt: skip
        row(f"{label} max", "stdio", "s", s["max"], fs["max"])

    fwarm = ours["floor_warm"]
    fw = {"x = 1": summary(fwarm["warm_trivial_s"]), "print(i)": summary(fwarm["warm_print_s"])}
    for transport, o in (("stdio", st), ("http", ht)):
        mw = {"x = 1": summary(o["warm_trivial_s"]), "print(i)": summary(o["warm_print_s"])}
        for code in ("x = 1", "print(i)"):
            m, f = mw[code], fw[code]
            if transport == "stdio":
                target, ok = f"<= {T_WARM_STDIO_RATIO}x floor", m["p50"] <= T_WARM_STDIO_RATIO * f["p50"]
            else:
                target, ok = f"<= floor + {T_HTTP_EXTRA_S * 1000:.0f} ms", m["p50"] <= f["p50"] + T_HTTP_EXTRA_S
            note = "SDK client; floor and ours measured in interleaved rounds"
            row(f"warm `{code}` p50", transport, "s", m["p50"], f["p50"], target, ok, note)
            row(f"warm `{code}` p95", transport, "s", m["p95"], f["p95"])
    for transport, o in (("stdio", st), ("http", ht)):
        m, f = summary(o["thin_warm_trivial_s"]), fw["x = 1"]
        note = ("informational: a hand-written JSON-RPC client instead of the SDK, i.e. the server's own "
                "cost; HTTP: keep-alive, TCP_NODELAY, TCP_QUICKACK")  # fmt: skip
        row("warm `x = 1` p50, thin client", transport, "s", m["p50"], f["p50"], note=note)
        row("warm `x = 1` p95, thin client", transport, "s", m["p95"], f["p95"])
    if ours.get("gateway", {}).get("warm_trivial_s"):
        gw = ours["gateway"]
        m, f = summary(gw["warm_trivial_s"]), fw["x = 1"]
        row("warm `x = 1` p50, kernel on a Jupyter Kernel Gateway", "stdio", "s", m["p50"], f["p50"],
            f"<= {T_GATEWAY_RATIO}x floor", m["p50"] <= T_GATEWAY_RATIO * f["p50"],
            "WebSocket to a local Kernel Gateway, in the same interleaved rounds; floor: direct ZeroMQ "
            "to a local kernel; compare with the local warm `x = 1` row")  # fmt: skip
        row("warm `x = 1` p95, kernel on a Jupyter Kernel Gateway", "stdio", "s", summary(gw["warm_trivial_s"])["p95"],
            f["p95"])  # fmt: skip
        m = summary(gw["warm_print_s"])
        row("warm `print(i)` p50, kernel on a Jupyter Kernel Gateway", "stdio", "s", m["p50"], fw["print(i)"]["p50"])
    m = summary(st["many_files_trivial_s"])
    row(f"warm `x = 1` p50, {MANY_FILES} files in folder", "stdio", "s", m["p50"], fw["x = 1"]["p50"],
        note="informational: change detection must not grow with the files in a session folder; "
             "compare with the warm `x = 1` row above")  # fmt: skip
    m = summary(ht["thin_noquickack_warm_trivial_s"])
    row("warm `x = 1` p50, thin, no TCP_QUICKACK", "http", "s", m["p50"], fw["x = 1"]["p50"],
        note="informational: the same thin client leaving ACKs to the delayed-ACK timer; about +40 ms "
             "means the server writes responses with Nagle's algorithm on (no TCP_NODELAY)")  # fmt: skip
    for transport, o in (("stdio", st), ("http", ht)):
        row("list_session_files p50 (no kernel)", transport, "s", summary(o["noop_s"])["p50"],
            note="informational: SDK client + MCP round trip alone")  # fmt: skip
    row("clear_session p50", "stdio", "s", summary(st["clear_session_s"])["p50"],
        summary(floor["graceful_shutdown_s"])["p50"],
        note="informational: floor = jupyter_client shutdown_kernel() (shutdown_request, wait for exit)")  # fmt: skip

    if "fair_loaded_s" in st:
        idle, loaded = summary(st["fair_idle_s"])["p50"], summary(st["fair_loaded_s"])["p50"]
        row(f"warm `x = 1` p50, another session running {BUSY_PROCESSES} busy processes", "stdio", "s", loaded,
            idle, f"<= {T_FAIR_RATIO}x idle", loaded <= T_FAIR_RATIO * idle,
            "floor column: the same session's warm `x = 1` p50 just before, with nothing else running "
            "(--kernel-cpus default: half the cores)")  # fmt: skip

    mp, fp = summary(st["plot_s"]), summary(floor["plot_s"])
    row("matplotlib plot p50", "stdio", "s", mp["p50"], fp["p50"], f"<= {T_PLOT_S} s", mp["p50"] <= T_PLOT_S,
        "floor: the same cell on a raw kernel (inline backend)")  # fmt: skip

    if "flood" in st:
        f, m = floor["flood"], st["flood"]
        lines = m["lines"]
        target = T_FLOOD_S_PER_300K * lines / 300_000
        label = f"{lines:,} lines printed with flush=True".replace(",", " ")
        if lines != 300_000:
            label += " (--quick: fewer than 300 000)"
        row(label, "stdio", "s", m["seconds"], f["seconds"], f"<= {target:g} s", m["seconds"] <= target,
            f"one cell `{FLOOD.format(n='N')}`; output bounded, its tail checked; floor: the same cell on a raw "
            f"kernel, to its idle (received {f['lines_received']} of {f['lines']} lines in {f['messages']} "
            "messages: its PUB socket drops beyond the high-water mark)")  # fmt: skip

    fork, launch = ours.get("stack_fork"), ours.get("stack_launch")
    if fork and launch:
        forked = all(fork.get("forked") or [False])
        note = "kernels forked from the template" if forked else "NOTE: kernels were launched (no fork on this host)"
        f, l = summary(fork["first_call_s"]), summary(launch["first_call_s"])
        row("first call, new session: pandas+numpy+pyplot, plot, show(), p50", "stdio", "s", f["p50"], l["p50"],
            f"<= {T_FIRST_CALL_S * 1000:.0f} ms", f["p50"] <= T_FIRST_CALL_S,
            f"{note}; server up {SETTLE_S:.0f} s; floor column: the same with --no-fork (launched kernels)")  # fmt: skip
        c, cl, b = summary(fork["cold_first_call_s"]), summary(launch["cold_first_call_s"]), summary(
            fork["bare_import_s"] + launch["bare_import_s"])
        row("the same as the server's first call, p50", "stdio", "s", c["p50"], b["p50"],
            f"<= floor + {T_COLD_EXTRA_S} s", c["p50"] <= b["p50"] + T_COLD_EXTRA_S,
            f"from the server's start to the answer; floor: bare `python -c '{STACK_IMPORT}'`; "
            f"--no-fork: {cl['p50']:.2f} s")  # fmt: skip
        fu, lu = summary(fork["idle_session_uss_kb"]), summary(launch["idle_session_uss_kb"])
        row("idle session after those imports, USS", "stdio", "kB", fu["p50"], lu["p50"],
            f"<= {T_IDLE_USS_KB // 1024} MB", fu["p50"] <= T_IDLE_USS_KB,
            f"Private_* of smaps_rollup, kernel + its wrapper (kernel alone: "
            f"{summary(fork['idle_uss_kb'])['p50']:.0f} kB); floor column: --no-fork")  # fmt: skip
        fb, lb = fork["burst"], launch["burst"]
        rate, lrate = fb["sessions"] / fb["seconds"], lb["sessions"] / lb["seconds"]
        row(f"burst of {fb['sessions']} new sessions (pool {POOL_SIZE})", "stdio", "sessions/s", rate, lrate,
            f">= {T_BURST_PER_S:.0f}/s", rate >= T_BURST_PER_S,
            "8 clients asking at once, first call `x = 1` each; floor column: --no-fork")  # fmt: skip

    fpar = floor["parallel"]
    for transport, o in (("stdio", st), ("http", ht)):
        p = o["parallel"]
        row(f"parallel {p['sessions']} x {p['calls'] // p['sessions']} calls", transport, "calls/s", p["calls_per_s"],
            fpar["calls_per_s"], f">= {T_PARALLEL_CPS:.0f}/s", p["calls_per_s"] >= T_PARALLEL_CPS,
            f"median of {len(p['reps_calls_per_s'])} runs; floor: one thread per raw client")  # fmt: skip

    cpus = os.cpu_count()
    for transport, o in (("stdio", st), ("http", ht)):
        p = o["parallel"]
        note = f"informational: CPU time per call; {cpus} CPUs are shared by client, server and kernels"
        row("warm: server CPU/call", transport, "us", o["warm_server_cpu_us_per_call"], note=note)
        row("warm: SDK client CPU/call", transport, "us", o["warm_client_cpu_us_per_call"])
        row("parallel: server CPU/call", transport, "us", p["server_cpu_us_per_call"])
        row("parallel: SDK client CPU/call", transport, "us", p["client_cpu_us_per_call"],
            fpar["client_cpu_us_per_call"])  # fmt: skip
        row("parallel: kernels CPU/call", transport, "us", p["kernels_cpu_us_per_call"],
            fpar["kernels_cpu_us_per_call"])  # fmt: skip

    for transport, o in (("stdio", st), ("http", ht)):
        row("server RSS, 1 session", transport, "kB", o["server_rss_kb_1"])
        v = o["parallel"]["server_rss_kb"]
        row(f"server RSS, {o['parallel']['sessions']} sessions", transport, "kB", v, None,
            f"<= {T_SERVER_RSS_KB // 1024} MB", v is not None and v <= T_SERVER_RSS_KB)  # fmt: skip
    k1, kn = st["kernel_rss_1"], st["parallel"]["kernel_rss"]
    row("kernel RSS, 1 session", "stdio", "kB", k1 and k1["mean_kb"], floor["kernel_rss_1"]["mean_kb"])
    label = f"{kn['n']} sessions" if kn else "N sessions"
    row(f"kernel RSS, {label}, mean", "stdio", "kB", kn and kn["mean_kb"], floor["kernel_rss_n"]["mean_kb"])
    row(f"kernel RSS, {label}, max", "stdio", "kB", kn and kn["max_kb"], floor["kernel_rss_n"]["max_kb"])
    return rows


def fmt_value(v, unit):
    if v is None:
        return "-"
    if unit == "s":
        return f"{v * 1000:.2f} ms" if v < 10 else f"{v:.2f} s"
    if unit == "kB":
        return f"{v / 1024:.1f} MB"
    if unit == "us":
        return f"{v:.0f} us"
    return f"{v:.0f}/s"


def print_table(rows, meta):
    head = ["metric", "transport", "ours", "floor", "ours/floor", "target", "pass"]
    body = [
        [
            r["metric"], r["transport"], fmt_value(r["ours"], r["unit"]), fmt_value(r["floor"], r["unit"]),
            f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-", r["target"] or "",
            "" if r["pass"] is None else ("PASS" if r["pass"] else "FAIL"),
        ]  # fmt: skip
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    right = {2, 3, 4}

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    print(line(head))
    print(line(["-" * w for w in widths]))
    for cells in body:
        print(line(cells))
    print()
    print(
        "floor: raw jupyter_client {jupyter_client} + ipykernel {ipykernel} (Python {python}), IPC, the server's "
        "kernel arguments; an execution is timed to the request's iopub idle.".format(**meta["floor_versions"])
    )
    print(
        f"ours: official MCP SDK {meta['mcp_version']} client -> {meta['bin']}; {meta['cpus']} CPUs"
        + ("; --quick (few iterations)" if meta["quick"] else "")
    )
    seen = set()
    for r in rows:
        if r["note"] and r["note"] not in seen:
            seen.add(r["note"])
            print(f"note: {r['metric']}: {r['note']}")
    if not meta["pool_size_flag"]:
        print(f"note: the binary has no --pool-size flag: no --pool-size {POOL_SIZE} row")
    print("ours/floor: below 1 is better for times and memory, above 1 for calls/s")
    passed = sum(1 for r in rows if r["pass"])
    failed = sum(1 for r in rows if r["pass"] is False)
    print(f"targets: {passed} pass, {failed} fail")


def kernel_python_of(binary):
    p = subprocess.run([binary, "--provision-only"], capture_output=True, text=True, timeout=900, env=server_env())
    m = re.search(r"kernel environment: (\S+)", ANSI_RE.sub("", p.stderr))
    if p.returncode != 0 or not m:
        raise RuntimeError(f"{binary} --provision-only did not name the kernel environment:\n{p.stderr[-2000:]}")
    return m.group(1)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "floor":
        ap = argparse.ArgumentParser(prog="bench.py floor", description="the floor half (kernel env's Python)")
        ap.add_argument("--json", action="store_true", help="run once, print the results as JSON on stdout")
        ap.add_argument("--serve", action="store_true", help="keep one warm kernel, time blocks on request")
        ap.add_argument("--quick", action="store_true")
        a = ap.parse_args(sys.argv[2:])
        if a.serve:
            floor_serve()
        else:
            result = floor_main(a.quick)
            print(json.dumps(result) if a.json else json.dumps(result, indent=1))
        return

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few iterations (a smoke run)")
    ap.add_argument("--json", default="target/bench.json", help="where to write the results (default %(default)s)")
    ap.add_argument("--bin", default="target/release/mcp-python-interpreter", help="server binary (default %(default)s)")
    a = ap.parse_args()
    binary = os.path.abspath(a.bin)
    if not os.access(binary, os.X_OK):
        sys.exit(f"no server binary at {binary} (build with cargo build --release)")
    n = QUICK if a.quick else FULL
    from importlib.metadata import version

    mcp_version = version("mcp")  # fails early under a Python without the SDK

    started = time.time()
    raise_on_sigterm()
    help_text = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30).stdout
    pool = "--pool-size" in help_text
    kernel_python = kernel_python_of(binary)

    log(f"floor: raw jupyter_client under {kernel_python}")
    floor = run_floor(kernel_python, a.quick)
    # With a pool, wait before each new session for the pool to refill.
    pause = max(1.0, 1.5 * statistics.median(floor["kernel_start_s"]))
    try:
        ours = asyncio.run(run_ours(binary, kernel_python, n, pool, pause))
    except (asyncio.CancelledError, KeyboardInterrupt):
        sys.exit("bench: interrupted (servers and kernels stopped)")
    except BaseExceptionGroup as group:
        leaf = leaf_exception(group)
        if leaf is group:
            raise
        raise leaf from None

    meta = {
        "bin": binary,
        "kernel_python": kernel_python,
        "quick": a.quick,
        "sizes": n,
        "pool_size_flag": pool,
        "pool_pause_s": pause if pool else None,
        "preload_flag": "--preload" in help_text,
        "cpus": os.cpu_count(),
        "mcp_version": mcp_version,
        "floor_versions": floor["versions"],
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - started, 1),
    }
    rows = build_rows(floor, ours, pause)
    print()
    print_table(rows, meta)
    print(f"run took {meta['seconds']} s; every sample in {a.json}")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "rows": rows, "floor": floor, "ours": ours}, f, indent=1)


if __name__ == "__main__":
    main()
