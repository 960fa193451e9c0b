"""End-to-end tests of giving a session data, with the official Python MCP SDK
over both transports: ``upload_file`` (text and binary, byte for byte as the
kernel reads them; hostile paths and planted symlinks refused with nothing
written outside; the disk quota), a host folder shared with ``--mount``
(readable, not writable, nothing beside it readable), and completion of the
``path`` of ``kernel://{session_id}/{path}`` (a session's files, nothing for
an unknown session or another principal's).

Run like test_e2e.py (``MCP_PI_BIN`` names the server binary).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from mcp import Client
from mcp.types import ResourceTemplateReference

from test_e2e import UNKNOWN_SESSION_ID, assert_ok, bearer_client, call, execute, http_server, run_with_server

QUOTA = 200_000
TEXT = "city,sales\nZürich,12\nLyon,7\n"
BINARY = bytes(range(256)) * 300  # 76 800 bytes, every byte value


async def upload(client: Client, **arguments: object) -> tuple[bool, dict]:
    result = await call(client, "upload_file", arguments)
    sc = result.structured_content
    assert sc is not None
    assert sc["success"] is (not result.is_error), sc
    return bool(result.is_error), sc


async def kernel_json(client: Client, sid: str, expression: str) -> object:
    """Evaluates ``expression`` in the kernel; returns its value via JSON on stdout."""
    result, sc = await execute(client, f"import json\nprint(json.dumps({expression}))", sid)
    assert_ok(result, sc)
    return json.loads(sc["output"][0])


async def upload_scenario(client: Client, data_dir: Path) -> None:
    outside = data_dir.parent / "outside"
    outside.mkdir()
    (outside / "target.txt").write_text("untouched")

    # Text, into a new session.
    failed, sc = await upload(client, session_id="", path="data/sales.csv", content=TEXT)
    assert not failed, sc
    sid = sc["session_id"]
    assert sc["path"] == "data/sales.csv"
    assert sc["replaced"] is False
    assert sc["file"] == {
        "uri": f"kernel://{sid}/data/sales.csv",
        "mime_type": "text/csv",
        "name": "data/sales.csv",
        "size": len(TEXT.encode()),
    }
    assert sid in sc["session_info"]["instructions"]

    # Binary, into the same session.
    failed, sc = await upload(
        client, session_id=sid, path="blob.bin", content_base64=base64.b64encode(BINARY).decode()
    )
    assert not failed, sc
    assert sc["file"]["size"] == len(BINARY)
    assert sc["session_info"] is None

    # The kernel reads both byte for byte, by the returned paths.
    seen = await kernel_json(
        client,
        sid,
        "[open('data/sales.csv', encoding='utf-8').read(), "
        "__import__('hashlib').sha256(open('blob.bin', 'rb').read()).hexdigest()]",
    )
    assert seen == [TEXT, hashlib.sha256(BINARY).hexdigest()]
    rr = await client.read_resource(f"kernel://{sid}/blob.bin")
    assert base64.b64decode(rr.contents[0].blob) == BINARY

    # Overwrite only when asked.
    failed, sc = await upload(client, session_id=sid, path="blob.bin", content="x")
    assert failed and sc["error"].startswith("FileExistsError:"), sc
    failed, sc = await upload(client, session_id=sid, path="blob.bin", content="x", overwrite=True)
    assert not failed and sc["replaced"] is True, sc

    # Hostile paths and symlinks the kernel plants pointing outside.
    result, sc = await execute(
        client,
        "import os\n"
        f"os.symlink({str(outside / 'target.txt')!r}, 'link.txt')\n"
        f"os.symlink({str(outside)!r}, 'out')\n"
        f"os.symlink({str(outside / 'new.txt')!r}, 'dangling.txt')",
        sid,
    )
    assert_ok(result, sc)
    for path in ["../x", "/etc/x", "a/../../x", "%2e%2e/x", "link.txt", "out/target.txt", "out/new.txt", "dangling.txt"]:
        for overwrite in (False, True):
            failed, sc = await upload(client, session_id=sid, path=path, content="pwned", overwrite=overwrite)
            assert failed and sc["error"].startswith("InvalidPathError:"), (path, sc)
    assert (outside / "target.txt").read_text() == "untouched"
    assert sorted(p.name for p in outside.iterdir()) == ["target.txt"]
    assert not (data_dir / "x").exists() and not (data_dir.parent / "x").exists()
    assert not Path("/etc/x").exists()
    assert (data_dir / sid / "link.txt").is_symlink()

    # Over the quota: refused, nothing written.
    failed, sc = await upload(client, session_id=sid, path="big/big.bin", content="b" * QUOTA)
    assert failed and sc["error"].startswith("DiskQuotaError:"), sc
    assert not (data_dir / sid / "big").exists()

    # An unknown session.
    failed, sc = await upload(client, session_id=UNKNOWN_SESSION_ID, path="a.txt", content="a")
    assert failed and sc["error"].startswith("SessionExpiredError:"), sc


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_upload(transport: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "sessions"
    data_dir.mkdir()
    run_with_server(transport, data_dir, upload_scenario, ("--max-session-bytes", str(QUOTA)))


TEMPLATE = ResourceTemplateReference(uri="kernel://{session_id}/{path}")
FILES = ["a.csv", "ab.csv", "notes.txt", "sub/c.csv"]


async def complete(client: Client, value: str, session_id: str | None, argument: str = "path") -> object:
    context = None if session_id is None else {"session_id": session_id}
    result = await client.complete(TEMPLATE, {"name": argument, "value": value}, context)
    return result.completion


async def make_files(client: Client) -> str:
    result, sc = await execute(
        client,
        "import os\nos.makedirs('sub')\n" + "".join(f"open({f!r}, 'w').write('x')\n" for f in FILES),
        "",
    )
    assert_ok(result, sc)
    return sc["session_id"]


async def completion_scenario(client: Client, data_dir: Path) -> None:
    assert client.server_capabilities.completions is not None
    sid = await make_files(client)
    c = await complete(client, "a", sid)
    assert c.values == ["a.csv", "ab.csv"] and c.total == 2 and c.has_more is False, c
    assert (await complete(client, "", sid)).values == FILES
    assert (await complete(client, "sub/", sid)).values == ["sub/c.csv"]
    assert (await complete(client, "zzz", sid)).values == []
    # Nothing for an unknown session, without one, or for session ids.
    assert (await complete(client, "", UNKNOWN_SESSION_ID)).values == []
    assert (await complete(client, "", None)).values == []
    assert (await complete(client, sid[:2], None, "session_id")).values == []


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_completions(transport: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "sessions"
    data_dir.mkdir()
    run_with_server(transport, data_dir, completion_scenario)


def test_completions_never_show_another_principals_files(tmp_path: Path) -> None:
    data_dir = tmp_path / "sessions"
    data_dir.mkdir()
    alice, bob = "alice-token-0123456789", "bob-token-0123456789ab"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice {alice}\nbob {bob}\n")

    async def scenario(url: str) -> None:
        async with bearer_client(url, alice) as a, bearer_client(url, bob) as b:
            sid = await make_files(a)
            assert (await complete(a, "", sid)).values == FILES
            assert (await complete(b, "", sid)).values == []
            assert (await complete(b, "a", sid)).values == []

    with http_server(data_dir, ("--tokens-file", str(tokens))) as server:
        asyncio.run(asyncio.wait_for(scenario(server.url), timeout=300))


SHARED_CSV = "city,sales\nLyon,7\nNice,5\n"
WRITES = {
    "create": "open(d + '/new.txt', 'w').write('x')",
    "append": "open(d + '/data.csv', 'a').write('x')",
    "remove": "os.remove(d + '/data.csv')",
    "rename": "os.rename(d + '/data.csv', d + '/moved.csv')",
    "mkdir": "os.mkdir(d + '/newdir')",
    "chmod": "os.chmod(d + '/data.csv', 0o600)",
}


def shared_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A folder to share, writable by anyone (only the share's read-only-ness
    can refuse a write), and a readable file beside it."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "data.csv").write_text(SHARED_CSV)
    shared.chmod(0o777)
    (shared / "data.csv").chmod(0o666)
    sibling = tmp_path / "sibling.txt"
    sibling.write_text("not shared")
    sibling.chmod(0o644)
    return shared, sibling


def host_folder_scenario(shared: Path, sibling: Path) -> Callable[[Client, Path], Awaitable[None]]:
    # A root server's kernels have mount namespaces: /mnt/NAME; otherwise the host path.
    target = "/mnt/shared" if os.geteuid() == 0 else str(shared)

    async def scenario(client: Client, data_dir: Path) -> None:
        result, sc = await execute(client, "import os, pandas as pd", "")
        assert_ok(result, sc)
        sid = sc["session_id"]
        assert f"{target} (read-only)" in sc["session_info"]["instructions"], sc["session_info"]
        assert f"{target} (read-only)" in (client.instructions or ""), client.instructions

        seen = await kernel_json(client, sid, f"[int(pd.read_csv('{target}/data.csv')['sales'].sum()), os.listdir('{target}')]")
        assert seen == [12, ["data.csv"]]

        attempts = "{" + ", ".join(f"{name!r}: attempt(lambda: {code})" for name, code in WRITES.items()) + "}"
        code = (
            "def attempt(f):\n"
            "    try:\n        f()\n        return 'ok'\n"
            "    except Exception as e:\n        return type(e).__name__\n"
            f"d = {target!r}\n"
            f"print(json.dumps([{attempts}, attempt(lambda: open({str(sibling)!r}).read()), "
            f"attempt(lambda: open(d + '/../sibling.txt').read())]))"
        )
        result, sc = await execute(client, "import json\n" + code, sid)
        assert_ok(result, sc)
        writes, beside, through_parent = json.loads(sc["output"][0])
        assert set(writes) == set(WRITES)
        assert "ok" not in writes.values(), writes
        assert beside != "ok" and through_parent != "ok", (beside, through_parent)

        assert sorted(p.name for p in shared.iterdir()) == ["data.csv"]
        assert (shared / "data.csv").read_text() == SHARED_CSV
        assert sibling.read_text() == "not shared"

    return scenario


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_host_folder(transport: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "sessions"
    data_dir.mkdir()
    shared, sibling = shared_folder(tmp_path)
    run_with_server(transport, data_dir, host_folder_scenario(shared, sibling), ("--mount", str(shared)))
