"""The client configurations in README.md, run as written.

Each block marked ``<!-- config: NAME -->`` in the README is parsed the way
its client reads it (JSON, or the words of a ``claude mcp add`` command),
and the server it names is started (stdio: the command and arguments
exactly as given, found on ``PATH``) or connected to (HTTP: the URL and
headers, with the address of a test server and its token put in), then used
through the official Python MCP SDK: state kept across two calls.

The Docker configuration runs only where ``MCP_PI_DOCKER`` names a
Docker-compatible command and ``MCP_PI_IMAGE`` the image built from the
Dockerfile (scripts/container-test sets both); the image and the volume it
names are replaced by those, so no user's image or sessions are touched.

``server.json`` (the MCP registry entry) is checked against the crate and the
image it describes.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from test_e2e import BIN, CALL_TIMEOUT, REMOTE_URL, SCENARIO_TIMEOUT, STARTS_OWN_SERVER, http_server

ROOT = Path(__file__).resolve().parents[2]
CONFIG_RE = re.compile(r"<!-- config: (\S+) -->\n```(json|bash)\n(.*?)```", re.S)
CLIENTS = {
    "claude-desktop-docker",
    "claude-desktop",
    "claude-code",
    "claude-code-http",
    "vscode",
    "vscode-http",
    "cursor",
    "cursor-http",
}
TOKEN = "config-token-0123456789abcdef"
# How each configuration refers to the token (VS Code input, Cursor and shell variables).
TOKEN_REFERENCES = re.compile(r"\$\{input:mcp-python-token\}|\$\{env:MCP_AUTH_TOKEN\}|\$MCP_AUTH_TOKEN")
README_URL = "http://127.0.0.1:8000/mcp"
DOCKER = os.environ.get("MCP_PI_DOCKER", "")
IMAGE = os.environ.get("MCP_PI_IMAGE", "")
README_IMAGE = "mcp-python-interpreter"
README_VOLUME = "mcp-python-interpreter-data"

pytestmark = pytest.mark.skipif(bool(REMOTE_URL), reason=STARTS_OWN_SERVER)


def configs() -> dict[str, tuple[str, str]]:
    found = CONFIG_RE.findall((ROOT / "README.md").read_text())
    assert len({name for name, _, _ in found}) == len(found), "a configuration name is used twice"
    return {name: (kind, text) for name, kind, text in found}


def entry(text: str) -> dict[str, Any]:
    """The `python` server of a JSON configuration (Claude Desktop and Cursor
    use `mcpServers`, VS Code `servers`)."""
    config = json.loads(text)
    servers = config.get("mcpServers", config.get("servers"))
    assert isinstance(servers, dict) and set(servers) == {"python"}, config
    return servers["python"]


def claude_mcp_add(text: str) -> tuple[list[str], list[str]]:
    """The options and, after `--`, the command of a `claude mcp add` line."""
    words = shlex.split(text.strip(), posix=True, comments=False)
    assert words[:3] == ["claude", "mcp", "add"], words
    if "--" in words:
        i = words.index("--")
        return words[3:i], words[i + 1 :]
    return words[3:], []


def stdio_command(name: str) -> tuple[str, list[str], dict[str, str]]:
    kind, text = configs()[name]
    if kind == "bash":
        options, command = claude_mcp_add(text)
        assert options[-1] == "python" and "--transport" not in options, options
        return command[0], command[1:], {}
    server = entry(text)
    assert server.get("type", "stdio") == "stdio", server
    return server["command"], server.get("args", []), server.get("env", {})


def http_endpoint(name: str) -> tuple[str, dict[str, str]]:
    kind, text = configs()[name]
    if kind == "bash":
        options, command = claude_mcp_add(text)
        assert command == [] and options[options.index("--transport") + 1] == "http", options
        urls = [o for o in options if o.startswith("http://")]
        headers = [options[i + 1] for i, o in enumerate(options) if o == "--header"]
        assert len(urls) == 1, options
        return urls[0], dict(h.split(": ", 1) for h in headers)
    server = entry(text)
    assert server.get("type", "http") == "http", server
    return server["url"], server.get("headers", {})


async def keeps_state(client: Client) -> None:
    first = await client.call_tool("execute_code", {"code": "x = 6 * 7", "session_id": ""}, read_timeout_seconds=CALL_TIMEOUT)
    sc = first.structured_content or {}
    assert sc.get("success"), sc
    second = await client.call_tool("execute_code", {"code": "x", "session_id": sc["session_id"]}, read_timeout_seconds=CALL_TIMEOUT)
    assert (second.structured_content or {}).get("result") == "42", second.structured_content


def run_stdio(command: str, args: list[str], env: dict[str, str]) -> None:
    params = StdioServerParameters(command=command, args=args, env=env)

    async def body() -> None:
        async with Client(params, cache=None) as client:
            await keeps_state(client)

    asyncio.run(asyncio.wait_for(body(), timeout=SCENARIO_TIMEOUT))


def test_every_client_has_a_configuration() -> None:
    assert set(configs()) == CLIENTS


@pytest.mark.parametrize("name", ["claude-desktop", "claude-code", "vscode", "cursor"])
def test_stdio_configuration(name: str, tmp_path: Path) -> None:
    command, args, env = stdio_command(name)
    assert command == "mcp-python-interpreter" and Path(BIN).name == command, (command, BIN)
    # As the client would: the command found on PATH (where `cargo install`
    # puts it). MCP_DATA_DIR keeps the test's sessions out of the user's folder.
    path = f"{Path(BIN).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    run_stdio(command, args, {**env, "PATH": path, "MCP_DATA_DIR": str(tmp_path / "sessions")})


@pytest.mark.parametrize("name", ["claude-code-http", "vscode-http", "cursor-http"])
def test_http_configuration(name: str, tmp_path: Path) -> None:
    url, headers = http_endpoint(name)
    assert url == README_URL, url
    assert headers and all(TOKEN_REFERENCES.search(v) for v in headers.values()), headers
    data_dir = tmp_path / "sessions"
    data_dir.mkdir()
    with http_server(data_dir, ("--auth-token", TOKEN)) as server:
        sent = {k: TOKEN_REFERENCES.sub(TOKEN, v) for k, v in headers.items()}

        async def body() -> None:
            http = httpx2.AsyncClient(headers=sent, timeout=CALL_TIMEOUT)
            async with Client(streamable_http_client(server.url, http_client=http), cache=None) as client:
                await keeps_state(client)

        asyncio.run(asyncio.wait_for(body(), timeout=SCENARIO_TIMEOUT))


@pytest.mark.skipif(not (DOCKER and IMAGE), reason="MCP_PI_DOCKER and MCP_PI_IMAGE are not set (scripts/container-test sets them)")
def test_docker_configuration() -> None:
    command, args, env = stdio_command("claude-desktop-docker")
    assert command == "docker" and f"{README_VOLUME}:/data" in args and args.count(README_IMAGE) == 1, args
    volume = f"mcp-python-interpreter-test-{os.getpid()}"
    args = [IMAGE if a == README_IMAGE else a.replace(README_VOLUME, volume) for a in args]
    try:
        # The whole environment: podman here needs CONTAINERS_CONF (runc, ulimits).
        run_stdio(DOCKER, args, {**os.environ, **env})
    finally:
        subprocess.run([DOCKER, "volume", "rm", "-f", volume], capture_output=True, timeout=60)


def test_registry_entry_matches_the_crate_and_the_image() -> None:
    server = json.loads((ROOT / "server.json").read_text())
    version = tomllib.loads((ROOT / "Cargo.toml").read_text())["package"]["version"]
    assert server["version"] == version
    assert re.fullmatch(r"[a-zA-Z0-9.-]+/[a-zA-Z0-9._-]+", server["name"]), server["name"]
    assert 0 < len(server["description"]) <= 100
    assert f'MCP_SERVER_NAME={server["name"]}' in (ROOT / "Dockerfile").read_text()
    for package in server["packages"]:
        assert package["registryType"] == "oci"
        assert package["identifier"].endswith(f":{version}"), package["identifier"]
        assert package["transport"]["type"] in ("stdio", "streamable-http"), package["transport"]
