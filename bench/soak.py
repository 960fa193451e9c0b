"""Soak: thousands of calls across many sessions, hostile cells included.

Drives the release binary over stdio with the official Python MCP SDK and
reports, per kind of cell, how many calls got an answer, plus the server's
RSS before and after. Not a test: it prints figures (and exits 1 if any call
went unanswered or a session stopped working).

    ./bench/soak [--calls 3000] [--sessions 8]
"""

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

from mcp import Client, StdioServerParameters

# (name, code, timeout seconds or None, weight)
CELLS = [
    ("trivial", "x = 1", None, 40),
    ("print", "print(i := (globals().get('i', 0) + 1))", None, 20),
    ("exception", "1/0", None, 8),
    ("input", "input('name?')", None, 5),
    ("timeout", "import time; time.sleep(5)", 0.3, 3),
    ("flood", "print('x' * 3_000_000)", None, 3),
    ("lines", "for k in range(20_000): print(k)", None, 3),
    ("progress-bar", "import sys\nfor k in range(200): sys.stdout.write(f'\\r{k}')\nprint()", None, 4),
    ("file", "open('f.csv','w').write('a,b\\n1,2\\n')", None, 6),
    ("figure", "import matplotlib.pyplot as plt; plt.plot([1,2]); plt.show()", None, 2),
    ("kernel-death", "import os; os._exit(1)", None, 1),
    ("segfault", "import ctypes; ctypes.string_at(0)", None, 1),
    ("stubborn", "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(3)", 0.3, 1),
    # The client gives up after 0.3 s (the SDK cancels the call); the
    # "answer" is that the session's next call works.
    ("cancelled", "import time; time.sleep(5)", None, 2),
    # With a progress callback: at least one notification must arrive.
    ("progress", "import time\nfor k in range(3):\n    print(k, flush=True); time.sleep(0.4)", None, 2),
]


def server_rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None


def kernels_in(data_dir):
    """(forked, launched): live kernels working in a folder of `data_dir`,
    told apart by their command line (a forked kernel keeps the template's)."""
    forked = launched = 0
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read()
            if b"__kernel-sandbox" in cmd or not os.readlink(f"/proc/{p}/cwd").startswith(data_dir):
                continue
        except OSError:
            continue
        if b"mcp-python-interpreter-kernel-template" in cmd:
            forked += 1
        elif b"ipykernel_launcher" in cmd:
            launched += 1
    return forked, launched


def find_server_pid(data_dir):
    out = subprocess.run(["pgrep", "-f", "--", f"--data-dir {data_dir}"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    return pids[0] if pids else None


async def worker(client, n_calls, seed, stats, failures):
    r = await client.call_tool("execute_code", {"code": "import os", "session_id": ""})
    sid = r.structured_content["session_id"]
    weights = [c[3] for c in CELLS]
    import random

    rnd = random.Random(seed)
    for _ in range(n_calls):
        name, code, timeout, _ = rnd.choices(CELLS, weights)[0]
        args = {"code": code, "session_id": sid}
        if timeout:
            args["timeout"] = timeout
        try:
            if name == "cancelled":
                try:
                    await asyncio.wait_for(client.call_tool("execute_code", args), 0.3)
                except asyncio.TimeoutError:
                    pass
                r = await asyncio.wait_for(client.call_tool("execute_code", {"code": "1 + 1", "session_id": sid}), 120)
                ok = (r.structured_content or {}).get("result") == "2"
            elif name == "progress":
                seen = []

                async def on_progress(progress, total, message, seen=seen):
                    seen.append(progress)

                r = await asyncio.wait_for(
                    client.call_tool("execute_code", args, progress_callback=on_progress), 120
                )
                ok = (r.structured_content or {}).get("success") is True and len(seen) >= 1
            else:
                r = await asyncio.wait_for(client.call_tool("execute_code", args), 120)
                s = r.structured_content
                ok = s is not None and "success" in s
            stats[(name, "answered" if ok else "malformed")] += 1
            if not ok:
                failures.append(f"{name}: {getattr(r, 'structured_content', None)}")
        except Exception as e:  # noqa: BLE001 - every failure is counted
            stats[(name, "no answer")] += 1
            failures.append(f"{name}: {e!r}")
    # The session must still work.
    r = await client.call_tool("execute_code", {"code": "6*7", "session_id": sid})
    if r.structured_content.get("result") != "42":
        failures.append(f"session {sid} unusable at the end: {r.structured_content}")
    await client.call_tool("clear_session", {"session_id": sid})


def folder_hashes(folder):
    """sha256 of every file under `folder`, by relative path."""
    import hashlib

    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


async def restart_phase(params, data_dir, n_sessions, failures):
    """Sessions with files and variables; the server is killed (SIGKILL) in
    the middle of a call; a new server on the same folder must give every
    session back with every file byte-identical and its variables replayed."""
    sids, hashes = [], {}
    try:
        async with Client(params, read_timeout_seconds=180) as client:
            for k in range(n_sessions):
                r = await client.call_tool("execute_code", {"code": f"v = {k}\nopen('a.txt','w').write('1' * {k})", "session_id": ""})
                sid = r.structured_content["session_id"]
                sids.append(sid)
                await client.call_tool("execute_code", {"code": f"open('a.txt','w').write('3' * {k + 1}); import os; os.makedirs('d', exist_ok=True); open('d/b.bin','wb').write(os.urandom(1000))", "session_id": sid})
            for sid in sids:
                hashes[sid] = folder_hashes(os.path.join(data_dir, sid))
            pid = find_server_pid(data_dir)
            # Killed while a call runs.
            call = asyncio.create_task(client.call_tool("execute_code", {"code": "import time; time.sleep(30)", "session_id": sids[0]}))
            await asyncio.sleep(0.5)
            os.kill(pid, 9)
            try:
                await asyncio.wait_for(call, 10)
            except BaseException:  # noqa: BLE001 - the server is gone
                pass
    except BaseException:  # noqa: BLE001 - the client notices the dead server
        pass
    lost = 0
    async with Client(params, read_timeout_seconds=180) as client:
        for k, sid in enumerate(sids):
            after = folder_hashes(os.path.join(data_dir, sid))
            if after != hashes[sid]:
                lost += 1
                failures.append(f"restart: files of {sid} changed: {hashes[sid]} -> {after}")
            r = await client.call_tool("execute_code", {"code": "(v, open('a.txt').read())", "session_id": sid})
            want = repr((k, "3" * (k + 1)))
            if (r.structured_content or {}).get("result") != want:
                failures.append(f"restart: session {sid} gave {r.structured_content}, wanted {want}")
            if folder_hashes(os.path.join(data_dir, sid)) != hashes[sid]:
                failures.append(f"restart: replay changed files of {sid}")
            await client.call_tool("clear_session", {"session_id": sid})
    files = sum(len(h) for h in hashes.values())
    print(f"restart (SIGKILL mid-call): {len(sids)} sessions, {files} files, {len(sids) - lost} sessions with every file intact")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/mcp-python-interpreter")
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--sessions", type=int, default=8)
    a = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="soak-")
    params = StdioServerParameters(
        command=a.bin,
        args=["--transport", "stdio", "--data-dir", data_dir, "--interrupt-grace", "2"],
        env={**os.environ, "LOG_LEVEL": "error"},
    )
    stats, failures = Counter(), []
    async with Client(params, read_timeout_seconds=180) as client:
        await client.call_tool("execute_code", {"code": "1", "session_id": ""})
        pid = find_server_pid(data_dir)
        start = server_rss_kb(pid)
        t0 = time.time()
        # A first quarter warms the server up (allocator pools, buffers);
        # "before" is taken after it, "after" at the end: flat means no leak.
        warm = max(1, a.calls // a.sessions // 4)
        await asyncio.gather(*(worker(client, warm, k, stats, failures) for k in range(a.sessions)))
        before = server_rss_kb(pid)
        per = a.calls // a.sessions - warm
        await asyncio.gather(*(worker(client, per, 100 + k, stats, failures) for k in range(a.sessions)))
        elapsed = time.time() - t0
        after = server_rss_kb(pid)
        forked, launched = kernels_in(data_dir)
    await restart_phase(params, data_dir, a.sessions, failures)
    total = sum(stats.values())
    answered = sum(v for (n, k), v in stats.items() if k == "answered")
    print(f"{'cell':<14} {'answered':>9} {'no answer':>10}")
    for name, *_ in CELLS:
        print(f"{name:<14} {stats[(name, 'answered')]:>9} {stats[(name, 'no answer')] + stats[(name, 'malformed')]:>10}")
    print(f"\n{answered}/{total} calls answered in {elapsed:.1f} s ({total / elapsed:.0f} calls/s) across {a.sessions} sessions")
    print(f"kernels alive at the end: {forked} forked from the template, {launched} launched")
    if None in (start, before, after):
        print("server RSS: could not find the server process")
    else:
        print(f"server RSS: {start} kB at start, {before} kB after the first quarter, {after} kB at the end "
              f"({(after - before) / 1024:+.1f} MB over the last three quarters)")
    for f in failures[:20]:
        print("FAILURE:", f)
    sys.exit(0 if answered == total and not failures else 1)


if __name__ == "__main__":
    asyncio.run(main())
