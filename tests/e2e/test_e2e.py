"""End-to-end tests for the mcp-python-interpreter server, driven by the official
Python MCP SDK (PyPI ``mcp``) over both transports (stdio and Streamable HTTP).

The server binary is taken from ``MCP_PI_BIN`` (default: the debug build). These
tests never build it. Run with:

    python -m pytest tests/e2e -v

Against a server that is already running (the container test,
scripts/container-test), set ``MCP_PI_URL`` (its endpoint), ``MCP_PI_TOKEN``
(its bearer token) and ``MCP_PI_DATA_DIR`` (its session folder as seen from
here): the HTTP scenarios then run against it, and tests that must start a
server of their own (stdio, other flags) are skipped, saying so.

No pytest plugins are needed: each test is a plain sync function that runs its
async body with ``asyncio.run`` under an overall time bound.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client, MCPError, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from mcp.types import BlobResourceContents, CallToolResult, TextContent, TextResourceContents

BIN = os.environ.get("MCP_PI_BIN", "/work/main/target/debug/mcp-python-interpreter")

# A server already running elsewhere (a container): endpoint, token, and its
# session folder as seen from this machine (a bind mount).
REMOTE_URL = os.environ.get("MCP_PI_URL") or None
REMOTE_TOKEN = os.environ.get("MCP_PI_TOKEN", "")
REMOTE_DATA_DIR = os.environ.get("MCP_PI_DATA_DIR", "")
STARTS_OWN_SERVER = "MCP_PI_URL is set: this test starts a server of its own, so it is left to the local suite"

# Generous bounds: the first call of a session starts a Jupyter kernel, and
# importing matplotlib/pandas for the first time can be slow on a cold cache.
CALL_TIMEOUT = 180.0  # one MCP request
SCENARIO_TIMEOUT = 600.0  # a whole async test body
LISTEN_TIMEOUT = 60.0  # HTTP server printing its address
SHUTDOWN_TIMEOUT = 15.0  # server exiting after SIGTERM

# Values for the dedicated short-timeout server of the expiry test.
SHORT_SESSION_TIMEOUT = 3
SHORT_CLEANUP_INTERVAL = 1

TOOL_NAMES = {"execute_code", "list_session_files", "clear_session", "export_notebook", "upload_file"}
EXECUTE_KEYS = {"success", "session_id", "output", "result", "error", "traceback", "files", "session_info"}
FILE_KEYS = {"uri", "mime_type", "name", "size"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
UNKNOWN_SESSION_ID = "AAAAAAAAAAAAAAAAAAAAAA"

LISTEN_RE = re.compile(r"mcp-python-interpreter: listening on (http://127\.0\.0\.1:(\d+)/mcp)")
ANSI_RE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
URL_SAFE_RE = re.compile(r"^[A-Za-z0-9_-]+$")
FIGURE_RE = re.compile(r"^figure_\d+\.png$")

MATPLOTLIB_CODE = (
    "import matplotlib.pyplot as plt\n"
    "plt.plot([1,2,3],[1,4,9])\n"
    "plt.savefig('plot.png')\n"
    "plt.show()"
)
CSV_CODE = "import pandas as pd\npd.DataFrame({'a':[1,2],'b':[3,4]}).to_csv('data.csv', index=False)"
CSV_TEXT = "a,b\n1,3\n2,4\n"


# --------------------------------------------------------------------------- #
# Server launching
# --------------------------------------------------------------------------- #


def _server_env() -> dict[str, str]:
    """The test process environment minus the server's own configuration
    variables, so that only the command-line flags given here apply."""
    server_vars = {
        "MCP_TRANSPORT",
        "MCP_HOST",
        "MCP_PORT",
        "MCP_DATA_DIR",
        "MCP_SESSION_TIMEOUT",
        "MCP_CLEANUP_INTERVAL",
        "MCP_EXECUTION_TIMEOUT",
        "LOG_LEVEL",
    }
    return {k: v for k, v in os.environ.items() if k not in server_vars}


def _binary() -> str:
    assert os.path.isfile(BIN) and os.access(BIN, os.X_OK), (
        f"server binary not found or not executable: {BIN} (set MCP_PI_BIN)"
    )
    return BIN


class HttpServer:
    """A server process on the Streamable HTTP transport with its stderr drained
    by a background thread (so the pipe can never fill up and block it)."""

    def __init__(self, data_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
        args = [
            _binary(),
            "--transport", "http",
            "--host", "127.0.0.1",
            "--port", "0",
            "--data-dir", str(data_dir),
            *extra_args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=_server_env(),
        )
        self.stderr_lines: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._drainer = threading.Thread(target=self._drain, name="mcp-server-stderr", daemon=True)
        self._drainer.start()
        self.url = self._wait_for_url()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace")
            self.stderr_lines.append(line)
            self._lines.put(line)
        self._lines.put(None)  # EOF: the process closed stderr (normally: it exited)

    def stderr_tail(self, n: int = 40) -> str:
        return "".join(self.stderr_lines[-n:])

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + LISTEN_TIMEOUT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                break
            if line is None:
                self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
                pytest.fail(
                    f"server exited (code {self.proc.returncode}) before listening; stderr:\n{self.stderr_tail()}"
                )
            match = LISTEN_RE.search(ANSI_RE.sub("", line))
            if match:
                assert 0 < int(match.group(2)) < 65536
                return match.group(1)
        self.kill()
        pytest.fail(f"server did not print its address within {LISTEN_TIMEOUT} s; stderr:\n{self.stderr_tail()}")

    def terminate(self) -> int:
        """SIGTERM the server and return its exit code; fail if it does not exit in time."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=SHUTDOWN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"server did not exit within {SHUTDOWN_TIMEOUT} s of SIGTERM; stderr:\n{self.stderr_tail()}")
        self._drainer.join(timeout=5)
        print(f"server exited with code {code} {time.monotonic() - started:.2f} s after SIGTERM")
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=SHUTDOWN_TIMEOUT)


@contextlib.contextmanager
def http_server(data_dir: Path, extra_args: tuple[str, ...] = ()) -> Iterator[HttpServer]:
    if REMOTE_URL:
        pytest.skip(STARTS_OWN_SERVER)
    server = HttpServer(data_dir, extra_args)
    try:
        yield server
    except BaseException:
        print(f"--- server stderr (tail) ---\n{server.stderr_tail()}")
        server.kill()
        raise
    # Reached only when the body succeeded: graceful shutdown is part of the test.
    code = server.terminate()
    assert code == 0, f"server exited with code {code} after SIGTERM; stderr:\n{server.stderr_tail()}"


Scenario = Callable[[Client, Path], Awaitable[None]]


def bearer_client(url: str, token: str) -> Client:
    """An SDK client that sends ``Authorization: Bearer TOKEN`` on every request."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=CALL_TIMEOUT)
    return Client(streamable_http_client(url, http_client=http), cache=None)


def run_with_server(transport: str, data_dir: Path, scenario: Scenario, extra_args: tuple[str, ...] = ()) -> None:
    """Start a server on ``transport``, connect the SDK client and run ``scenario``."""

    async def with_client(target: StdioServerParameters | str) -> None:
        # cache=None: every request really reaches the server.
        if REMOTE_URL:
            client = bearer_client(REMOTE_URL, REMOTE_TOKEN)
        else:
            client = Client(target, cache=None)
        async with client:
            print(f"{transport}: negotiated protocol version {client.protocol_version}")
            await scenario(client, data_dir)

    def run(target: StdioServerParameters | str) -> None:
        try:
            asyncio.run(asyncio.wait_for(with_client(target), timeout=SCENARIO_TIMEOUT))
        except BaseExceptionGroup as group:
            # The SDK's task groups wrap a failing assertion in (nested) single-member
            # exception groups; report the assertion itself.
            leaf: BaseException = group
            while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
                leaf = leaf.exceptions[0]
            if leaf is group:
                raise
            raise leaf from None

    if REMOTE_URL:
        if transport != "http" or extra_args:
            pytest.skip(STARTS_OWN_SERVER)
        assert REMOTE_DATA_DIR, "MCP_PI_URL needs MCP_PI_DATA_DIR: the server's session folder as seen from here"
        data_dir = Path(REMOTE_DATA_DIR)
        run(REMOTE_URL)
    elif transport == "stdio":
        params = StdioServerParameters(
            command=_binary(),
            args=["--transport", "stdio", "--data-dir", str(data_dir), *extra_args],
        )
        run(params)
    elif transport == "http":
        with http_server(data_dir, extra_args) as server:
            run(server.url)
    else:  # pragma: no cover
        raise ValueError(transport)


# --------------------------------------------------------------------------- #
# Call helpers and assertions
# --------------------------------------------------------------------------- #


async def call(client: Client, tool: str, arguments: dict[str, Any]) -> CallToolResult:
    """Call a tool and check the result carries its JSON both structured and as text."""
    result = await client.call_tool(tool, arguments, read_timeout_seconds=CALL_TIMEOUT)
    assert isinstance(result.structured_content, dict), f"{tool}: no structured content: {result!r}"
    assert result.content, f"{tool}: empty content"
    first = result.content[0]
    assert isinstance(first, TextContent), f"{tool}: content[0] is not text: {first!r}"
    assert json.loads(first.text) == result.structured_content, f"{tool}: text block differs from structured content"
    return result


async def execute(client: Client, code: str, session_id: str) -> tuple[CallToolResult, dict[str, Any]]:
    result = await call(client, "execute_code", {"code": code, "session_id": session_id})
    sc = result.structured_content
    assert sc is not None
    assert set(sc) == EXECUTE_KEYS, f"unexpected execute_code fields: {sorted(sc)}"
    assert isinstance(sc["success"], bool)
    assert isinstance(sc["session_id"], str)
    assert isinstance(sc["output"], list) and all(isinstance(x, str) for x in sc["output"])
    assert isinstance(sc["traceback"], list) and all(isinstance(x, str) for x in sc["traceback"])
    assert sc["result"] is None or isinstance(sc["result"], str)
    assert sc["error"] is None or isinstance(sc["error"], str)
    for f in sc["files"]:
        assert set(f) == FILE_KEYS, f"unexpected file fields: {f}"
    return result, sc


def assert_ok(result: CallToolResult, sc: dict[str, Any]) -> None:
    assert sc["success"] is True, f"execution failed: {sc}"
    assert result.is_error is False
    assert sc["error"] is None
    assert sc["traceback"] == []


def assert_session_expired(result: CallToolResult, sc: dict[str, Any]) -> None:
    assert sc["success"] is False, f"expected SessionExpiredError, got {sc}"
    assert isinstance(sc["error"], str) and sc["error"].startswith("SessionExpiredError:"), sc["error"]
    assert result.is_error is True


async def assert_files_listing_expired(client: Client, session_id: str) -> None:
    result = await call(client, "list_session_files", {"session_id": session_id})
    sc = result.structured_content
    assert sc is not None
    error = sc.get("error")
    assert isinstance(error, str) and error.startswith("SessionExpiredError:"), sc
    assert sc.get("files") in (None, []), sc


def files_by_name(sc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    by_name = {f["name"]: f for f in sc["files"]}
    assert len(by_name) == len(sc["files"]), f"duplicate file names: {sc['files']}"
    return by_name


async def read_png(client: Client, data_dir: Path, session_id: str, ref: dict[str, Any]) -> None:
    """Read a PNG file resource back and check it against the reported metadata and the disk."""
    assert ref["uri"] == f"kernel://{session_id}/{ref['name']}"
    assert ref["mime_type"] == "image/png"
    rr = await client.read_resource(ref["uri"])
    assert len(rr.contents) == 1, rr
    contents = rr.contents[0]
    assert isinstance(contents, BlobResourceContents), f"{ref['name']}: expected blob contents, got {contents!r}"
    assert contents.uri == ref["uri"]
    assert contents.mime_type == "image/png"
    data = base64.b64decode(contents.blob, validate=True)
    assert data.startswith(PNG_SIGNATURE), data[:16]
    assert len(data) == ref["size"]
    assert (data_dir / session_id / ref["name"]).read_bytes() == data


# --------------------------------------------------------------------------- #
# Scenarios
# --------------------------------------------------------------------------- #


async def main_scenario(client: Client, data_dir: Path) -> None:
    # 1. Tools: exactly these, each with an output schema.
    listing = await client.list_tools()
    tools = {t.name: t for t in listing.tools}
    assert set(tools) == TOOL_NAMES and len(listing.tools) == len(TOOL_NAMES), sorted(t.name for t in listing.tools)
    for tool in tools.values():
        assert isinstance(tool.output_schema, dict) and tool.output_schema, f"{tool.name}: no outputSchema"
        assert tool.output_schema.get("type") == "object", f"{tool.name}: {tool.output_schema}"
    exec_props = tools["execute_code"].input_schema.get("properties", {})
    assert {"code", "session_id", "timeout"} <= set(exec_props), exec_props
    assert "code" in tools["execute_code"].input_schema.get("required", [])
    for name in ("list_session_files", "clear_session"):
        assert "session_id" in tools[name].input_schema.get("properties", {}), tools[name].input_schema

    # 2. New session.
    result, sc = await execute(client, "x = 21\nprint('hello')", "")
    assert_ok(result, sc)
    assert sc["output"] == ["hello\n"]
    assert sc["result"] is None
    assert sc["files"] == []
    sid = sc["session_id"]
    assert len(sid) >= 16, sid
    assert URL_SAFE_RE.match(sid), sid
    info = sc["session_info"]
    assert isinstance(info, dict), f"session_info missing on the creating call: {sc}"
    assert info["session_id"] == sid
    assert isinstance(info["instructions"], str) and sid in info["instructions"]
    session_dir = data_dir / sid
    assert session_dir.is_dir(), f"no session folder {session_dir}"

    # 3. Persistence.
    result, sc = await execute(client, "x * 2", sid)
    assert_ok(result, sc)
    assert sc["session_id"] == sid
    assert sc["result"] == "42"
    assert sc["output"] == []
    assert sc["session_info"] is None

    # 4. A Python exception.
    result, sc = await execute(client, "1/0", sid)
    assert sc["success"] is False
    assert result.is_error is True
    assert sc["session_id"] == sid
    assert sc["error"] == "ZeroDivisionError: division by zero"
    assert sc["traceback"], "empty traceback"
    assert any("ZeroDivisionError" in line for line in sc["traceback"]), sc["traceback"]
    assert not any("\x1b" in line for line in sc["traceback"]), sc["traceback"]
    assert sc["result"] is None
    # ...and the session survives it.
    result, sc = await execute(client, "x", sid)
    assert_ok(result, sc)
    assert sc["result"] == "21"

    # 5. matplotlib: a saved file and the figure shown by plt.show().
    result, sc = await execute(client, MATPLOTLIB_CODE, sid)
    assert_ok(result, sc)
    files = files_by_name(sc)
    assert "plot.png" in files, sc["files"]
    figures = [name for name in files if FIGURE_RE.match(name)]
    assert figures, f"no figure_N.png among {sorted(files)}"
    assert "figure_1.png" in figures, figures
    for name in ["plot.png", *figures]:
        ref = files[name]
        assert ref["size"] > len(PNG_SIGNATURE)
        assert f"File created: {name} (image/png, {ref['size']} bytes)" in sc["output"], sc["output"]
        await read_png(client, data_dir, sid, ref)

    # 6. CSV via pandas, read back as text.
    result, sc = await execute(client, CSV_CODE, sid)
    assert_ok(result, sc)
    files = files_by_name(sc)
    assert "data.csv" in files, sc["files"]
    csv_ref = files["data.csv"]
    assert csv_ref["mime_type"] == "text/csv"
    assert csv_ref["size"] == len(CSV_TEXT.encode())
    assert csv_ref["uri"] == f"kernel://{sid}/data.csv"
    assert "File created: data.csv (text/csv, 12 bytes)" in sc["output"], sc["output"]
    rr = await client.read_resource(csv_ref["uri"])
    assert len(rr.contents) == 1, rr
    contents = rr.contents[0]
    assert isinstance(contents, TextResourceContents), f"expected text contents, got {contents!r}"
    assert contents.uri == csv_ref["uri"]
    assert contents.mime_type == "text/csv"
    assert contents.text == CSV_TEXT

    # 7. list_session_files.
    result = await call(client, "list_session_files", {"session_id": sid})
    assert result.is_error is False
    listing_sc = result.structured_content
    assert listing_sc is not None
    assert listing_sc["session_id"] == sid
    assert listing_sc.get("error") is None, listing_sc
    listed = files_by_name(listing_sc)
    assert {"plot.png", "data.csv"} <= set(listed), sorted(listed)
    assert listed["data.csv"] == csv_ref
    assert listed["plot.png"]["mime_type"] == "image/png"
    assert listed["plot.png"]["uri"] == f"kernel://{sid}/plot.png"
    for ref in listed.values():
        assert set(ref) == FILE_KEYS, ref

    # 8. clear_session: kernel and files gone, the id no longer usable.
    result = await call(client, "clear_session", {"session_id": sid})
    sc = result.structured_content
    assert sc is not None
    assert sc["success"] is True, sc
    assert isinstance(sc["message"], str) and sc["message"]
    assert result.is_error is False
    assert not session_dir.exists(), f"{session_dir} still exists after clear_session"
    result, sc = await execute(client, "x", sid)
    assert_session_expired(result, sc)
    await assert_files_listing_expired(client, sid)
    with pytest.raises(MCPError):
        await client.read_resource(csv_ref["uri"])
    assert not session_dir.exists(), f"{session_dir} reappeared after using the cleared id"

    # 10. A made-up id.
    result, sc = await execute(client, "1 + 1", UNKNOWN_SESSION_ID)
    assert_session_expired(result, sc)
    assert sc["result"] is None
    await assert_files_listing_expired(client, UNKNOWN_SESSION_ID)
    assert not (data_dir / UNKNOWN_SESSION_ID).exists()


async def expiry_scenario(client: Client, data_dir: Path) -> None:
    result, sc = await execute(client, "x = 1", "")
    assert_ok(result, sc)
    sid = sc["session_id"]
    session_dir = data_dir / sid
    assert session_dir.is_dir()

    # Idle for half the timeout: the session must still be alive.
    last_use = time.monotonic()
    await asyncio.sleep(SHORT_SESSION_TIMEOUT / 2)
    result, sc = await execute(client, "x + 1", sid)
    assert_ok(result, sc)
    assert sc["result"] == "2"
    last_use = time.monotonic()

    # Stay idle past the timeout plus one sweep interval (plus slack). Poll only
    # passively (the session folder), since any call on the session would
    # count as use; stop early once the sweep has removed the folder.
    idle_limit = SHORT_SESSION_TIMEOUT + SHORT_CLEANUP_INTERVAL + 1.0
    while time.monotonic() - last_use < idle_limit and session_dir.exists():
        await asyncio.sleep(0.1)
    idle = time.monotonic() - last_use
    print(f"idle for {idle:.2f} s; session folder present: {session_dir.exists()}")

    result, sc = await execute(client, "x", sid)
    assert_session_expired(result, sc)
    await assert_files_listing_expired(client, sid)

    # The sweep also deletes the session's folder (bounded wait).
    deadline = time.monotonic() + 15
    while session_dir.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert not session_dir.exists(), f"{session_dir} still exists after the session expired"

    # A fresh session still works on this server.
    result, sc = await execute(client, "40 + 2", "")
    assert_ok(result, sc)
    assert sc["result"] == "42"
    assert sc["session_id"] != sid


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_main_scenario(transport: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "sessions"
    data_dir.mkdir()
    run_with_server(transport, data_dir, main_scenario)


def test_idle_session_expires(tmp_path: Path) -> None:
    data_dir = tmp_path / "sessions"
    data_dir.mkdir()
    extra = (
        "--session-timeout", str(SHORT_SESSION_TIMEOUT),
        "--cleanup-interval", str(SHORT_CLEANUP_INTERVAL),
    )  # fmt: skip
    run_with_server("stdio", data_dir, expiry_scenario, extra)
