"""A session across a server restart, for scripts/container-test.

    session_probe.py URL TOKEN set          new session: a variable and a file; prints its id
    session_probe.py URL TOKEN check ID     the variable (replayed) and the file are back

Exits non-zero, saying why, when they are not.
"""

from __future__ import annotations

import asyncio
import sys

from test_e2e import CALL_TIMEOUT, bearer_client

SET = "kept = 6 * 7\nopen('kept.txt', 'w').write('still here')"


async def main(url: str, token: str, action: str, sid: str) -> str:
    async with bearer_client(url, token) as client:
        if action == "set":
            r = await client.call_tool("execute_code", {"code": SET, "session_id": ""}, read_timeout_seconds=CALL_TIMEOUT)
            sc = r.structured_content or {}
            if not sc.get("success"):
                sys.exit(f"session_probe: creating the session failed: {sc}")
            return sc["session_id"]
        r = await client.call_tool("execute_code", {"code": "kept", "session_id": sid}, read_timeout_seconds=CALL_TIMEOUT)
        sc = r.structured_content or {}
        if sc.get("result") != "42":
            sys.exit(f"session_probe: after the restart, `kept` is not 42: {sc}")
        r = await client.call_tool("list_session_files", {"session_id": sid}, read_timeout_seconds=CALL_TIMEOUT)
        names = [f["name"] for f in (r.structured_content or {}).get("files", [])]
        if "kept.txt" not in names:
            sys.exit(f"session_probe: after the restart, kept.txt is gone: {names}")
        return f"session {sid} restored: {' '.join(sc.get('output', []))[:200]!r}"


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[3] not in ("set", "check") or (sys.argv[3] == "check") != (len(sys.argv) == 5):
        sys.exit(__doc__)
    print(asyncio.run(asyncio.wait_for(main(*sys.argv[1:4], sys.argv[4] if len(sys.argv) == 5 else ""), timeout=300)))
