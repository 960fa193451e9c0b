"""The HTTP endpoint behind a bearer token, as a deployment runs it, with the
official Python MCP SDK: a request without the token (or with a wrong one)
gets 401 and reaches no tool; with it, a session keeps its state across
calls, a figure comes back as a ``kernel://`` resource, and a cell finds the
token nowhere in its environment; what confinement the kernels got is
measured and printed.

Locally each test starts a server with a tokens file. With ``MCP_PI_URL``
(scripts/container-test) they run against that server instead, with
``MCP_PI_TOKEN``; ``MCP_PI_SECRET_FILE`` then names a file inside the server's
file system that holds the token (the container's mounted secret), which a
cell must not be able to read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx2
import pytest
from mcp import Client

from test_e2e import (
    MATPLOTLIB_CODE,
    REMOTE_DATA_DIR,
    REMOTE_TOKEN,
    REMOTE_URL,
    SCENARIO_TIMEOUT,
    assert_ok,
    bearer_client,
    execute,
    files_by_name,
    http_server,
    read_png,
)

LOCAL_TOKEN = "e2e-token-0123456789abcdef"
SECRET_FILE = os.environ.get("MCP_PI_SECRET_FILE", "")
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "e2e", "version": "0"},
    },
}


@contextlib.contextmanager
def endpoint(tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """URL, token and session folder of a server that requires a token."""
    if REMOTE_URL:
        assert REMOTE_TOKEN and REMOTE_DATA_DIR, "MCP_PI_URL needs MCP_PI_TOKEN and MCP_PI_DATA_DIR"
        yield REMOTE_URL, REMOTE_TOKEN, Path(REMOTE_DATA_DIR)
        return
    data_dir = tmp_path / "sessions"
    data_dir.mkdir()
    tokens = tmp_path / "tokens"
    tokens.write_text(f"default {LOCAL_TOKEN}\n")
    tokens.chmod(0o600)
    with http_server(data_dir, ("--tokens-file", str(tokens))) as server:
        yield server.url, LOCAL_TOKEN, data_dir


def with_token(tmp_path: Path, scenario: Callable[[Client, str, Path], Awaitable[None]]) -> None:
    with endpoint(tmp_path) as (url, token, data_dir):

        async def body() -> None:
            async with bearer_client(url, token) as client:
                await scenario(client, token, data_dir)

        asyncio.run(asyncio.wait_for(body(), timeout=SCENARIO_TIMEOUT))


def test_requests_without_the_token_are_refused(tmp_path: Path) -> None:
    with endpoint(tmp_path) as (url, token, _):
        headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
        for auth in (None, "Bearer wrong-token-0123456789abcdef", f"Basic {token}", token):
            h = headers if auth is None else {**headers, "Authorization": auth}
            r = httpx2.post(url, json=INITIALIZE, headers=h, timeout=30)
            assert r.status_code == 401, f"Authorization {auth!r}: {r.status_code} {r.text[:200]}"
            assert r.headers.get("www-authenticate") == "Bearer", r.headers
            assert "jsonrpc" not in r.text, r.text
        r = httpx2.post(url, json=INITIALIZE, headers={**headers, "Authorization": f"Bearer {token}"}, timeout=30)
        assert r.status_code == 200, f"{r.status_code} {r.text[:200]}"

        async def wrong_token() -> None:
            async with bearer_client(url, "wrong-token-0123456789abcdef") as client:
                await client.list_tools()

        # The SDK reports the 401 as an error response, wrapped in task groups.
        with pytest.raises(BaseException):
            asyncio.run(asyncio.wait_for(wrong_token(), timeout=60))


async def state_and_figure(client: Client, token: str, data_dir: Path) -> None:
    result, sc = await execute(client, "x = 21", "")
    assert_ok(result, sc)
    sid = sc["session_id"]
    result, sc = await execute(client, "x * 2", sid)
    assert_ok(result, sc)
    assert sc["result"] == "42"

    result, sc = await execute(client, MATPLOTLIB_CODE, sid)
    assert_ok(result, sc)
    files = files_by_name(sc)
    for name in ("plot.png", "figure_1.png"):
        assert name in files, sc["files"]
        await read_png(client, data_dir, sid, files[name])

    # The token is the server's, never the kernels'.
    code = f"import os\nprint(any({token!r} in v for v in os.environ.values()))"
    result, sc = await execute(client, code, sid)
    assert_ok(result, sc)
    assert sc["output"] == ["False\n"], "a cell can read the bearer token from its environment"
    if SECRET_FILE:
        result, sc = await execute(client, f"open({SECRET_FILE!r}).read()", sid)
        assert sc["success"] is False, f"a cell read the mounted token file {SECRET_FILE}: {sc}"
        assert sc["error"].startswith(("PermissionError", "FileNotFoundError")), sc["error"]


def test_with_the_token_a_session_keeps_state_and_files(tmp_path: Path) -> None:
    with_token(tmp_path, state_and_figure)


# Measured inside a kernel: who it runs as and what it may do. Printed (run
# pytest with -rP to see it); the asserts hold on every supported host.
PROBE = r"""
import json, os
def attempt(f):
    try:
        f()
        return "allowed"
    except Exception as e:
        return type(e).__name__
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\t" in l)
tmp_probe = "/tmp/probe-" + str(os.getpid())
facts = {
    "uid": os.getuid(),
    "no_new_privs": status.get("NoNewPrivs", "?").strip(),
    "seccomp": status.get("Seccomp", "?").strip(),
    "cap_eff": status.get("CapEff", "?").strip(),
    "pids_visible": len([p for p in os.listdir("/proc") if p.isdigit()]),
    "write_beside_session": attempt(lambda: open("../probe", "w").write("x")),
    "write_etc": attempt(lambda: open("/etc/probe", "w").write("x")),
    "read_passwd": attempt(lambda: open("/etc/passwd").read()),
    "list_parent_of_session": attempt(lambda: os.listdir("..")),
    "others_beside_session": attempt(
        lambda: [n for n in os.listdir("..") if n != os.path.basename(os.getcwd())] and 1 / 0
    ),
    "write_tmp": attempt(lambda: open(tmp_probe, "w").write("x")),
    "tmp_entries": sorted(os.listdir("/tmp"))[:10] if os.path.isdir("/tmp") else None,
    "kill_pid_1": attempt(lambda: os.kill(1, 0)),
}
print(json.dumps(facts))
"""

PLOTLY = "import plotly.express as px\npx.bar(x=['a', 'b'], y=[1, 3]).show()"


async def confinement(client: Client, token: str, data_dir: Path) -> None:
    # Another session beside the probing one, which it must not see.
    result, sc = await execute(client, "1", "")
    assert_ok(result, sc)
    result, sc = await execute(client, PROBE, "")
    assert_ok(result, sc)
    sid = sc["session_id"]
    facts = json.loads(sc["output"][-1])
    result, sc = await execute(client, PLOTLY, sid)
    facts["plotly_png_export"] = "ok" if sc["success"] and "figure_1.png" in files_by_name(sc) else sc["error"]
    print(f"kernel confinement measured: {json.dumps(facts, indent=1)}")
    assert facts["uid"] != 0, facts
    assert facts["no_new_privs"] == "1", facts
    assert facts["write_etc"] != "allowed" and facts["write_beside_session"] != "allowed", facts
    # The folder holding the session folders shows no other session: a
    # launched kernel may not list it at all; a forked one sees its private
    # view's mount point, which holds its own folder only.
    assert facts["others_beside_session"] != "ZeroDivisionError", facts
    assert facts["read_passwd"] == "allowed", facts
    assert facts["kill_pid_1"] != "allowed", facts
    # Every host this server supports here gives kernels a private /tmp (root:
    # mount namespaces; otherwise a user namespace, as in a default container).
    assert facts["write_tmp"] == "allowed", facts
    assert facts["plotly_png_export"] == "ok", facts


def test_kernel_confinement(tmp_path: Path) -> None:
    with_token(tmp_path, confinement)
