"""End-to-end tests of rich results with the official Python MCP SDK, over
stdio and Streamable HTTP: figures returned as ``image`` blocks within the
inline budget, a ``resource_link`` block for every reported file, Markdown
and HTML displays, and the notebook export checked by the reference
``nbformat`` validator.

Run with ``python -m pytest tests/e2e -q -k rich`` (see test_e2e.py).
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import nbformat
import pytest
from mcp import Client
from mcp.types import CallToolResult, ImageContent, ResourceLink, TextResourceContents

from test_e2e import assert_ok, call, execute, files_by_name, run_with_server

# The server's defaults (README, Configuration).
MAX_INLINE = 4
MAX_SIDE = 1568
MAX_PIXELS = 1_150_000
MAX_BYTES = 1_000_000

SMALL_PLOT = "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3], [1, 4, 9])\nplt.show()"
BIG_PLOT = (
    "fig = plt.figure(figsize=(30, 30), dpi=100)\n"
    "plt.plot(range(100), [i * i for i in range(100)])\n"
    "plt.savefig('big.png', dpi=100)\n"
    "plt.show()"
)
SIX_PLOTS = "for i in range(6):\n    plt.figure(figsize=(2, 2))\n    plt.plot([0, i])\n    plt.show()"
MARKDOWN = "from IPython.display import display, Markdown, Math\ndisplay(Markdown('# hi *there*'))\ndisplay(Math('x^2'))"
HTML_ONLY = (
    "import plotly.graph_objects as go\n"
    "from IPython.display import HTML\n"
    "go.Figure(go.Bar(x=['a', 'b'], y=[1, 2])).show(renderer='notebook_connected')\n"
    "HTML('<table><tr><th>name</th><th>n</th></tr><tr><td>x &amp; y</td><td>1</td></tr></table>')"
)


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG (IHDR) or JPEG (first SOF marker)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        assert data[12:16] == b"IHDR", data[:32]
        return struct.unpack(">II", data[16:24])
    assert data.startswith(b"\xff\xd8"), data[:16]
    i = 2
    while i < len(data):
        assert data[i] == 0xFF, f"bad JPEG marker at {i}"
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    raise AssertionError("no JPEG frame header")


def images(result: CallToolResult) -> list[tuple[str, bytes]]:
    return [
        (block.mime_type, base64.b64decode(block.data, validate=True))
        for block in result.content
        if isinstance(block, ImageContent)
    ]


def assert_within_budget(mime: str, data: bytes) -> tuple[int, int]:
    assert mime in ("image/png", "image/jpeg"), mime
    w, h = image_size(data)
    assert max(w, h) <= MAX_SIDE and w * h <= MAX_PIXELS, (w, h)
    assert len(data) <= MAX_BYTES, len(data)
    return w, h


def assert_links_match_files(result: CallToolResult, sc: dict[str, Any]) -> None:
    """Every listed file has a resource_link block with the same facts, and nothing else does."""
    links = {block.uri: block for block in result.content if isinstance(block, ResourceLink)}
    assert len(links) == len(sc["files"]), (list(links), sc["files"])
    for f in sc["files"]:
        link = links.get(f["uri"])
        assert link is not None, f"no resource_link for {f}"
        assert (link.name, link.mime_type, link.size) == (f["name"], f["mime_type"], f["size"]), link


async def rich_scenario(client: Client, data_dir: Path) -> None:
    tools = {t.name for t in (await client.list_tools()).tools}
    assert "export_notebook" in tools, tools

    # 1. A small figure comes back as an image block, unchanged, and as a link.
    result, sc = await execute(client, SMALL_PLOT, "")
    assert_ok(result, sc)
    sid = sc["session_id"]
    files = files_by_name(sc)
    assert list(files) == ["figure_1.png"], files
    shown = images(result)
    assert len(shown) == 1, result.content
    mime, data = shown[0]
    assert_within_budget(mime, data)
    assert data == (data_dir / sid / "figure_1.png").read_bytes()
    assert_links_match_files(result, sc)

    # 2. A 3000x3000 figure: the files stay full size, the inline copies fit the budget.
    result, sc = await execute(client, BIG_PLOT, sid)
    assert_ok(result, sc)
    files = files_by_name(sc)
    assert {"big.png", "figure_2.png"} <= set(files), files
    for name in ("big.png", "figure_2.png"):
        w, h = image_size((data_dir / sid / name).read_bytes())
        assert min(w, h) > 2000, (name, w, h)
    shown = images(result)
    assert len(shown) == 2, [m for m, _ in shown]
    for mime, data in shown:
        w, h = assert_within_budget(mime, data)
        assert min(w, h) > 500, (w, h)
    assert any("scaled down" in line for line in sc["output"]), sc["output"]
    assert_links_match_files(result, sc)

    # 3. At most MAX_INLINE images per call; every file is still listed and linked.
    result, sc = await execute(client, SIX_PLOTS, sid)
    assert_ok(result, sc)
    assert len(sc["files"]) == 6, sc["files"]
    assert len(images(result)) == MAX_INLINE
    assert any("2 more image(s) not shown inline" in line for line in sc["output"]), sc["output"]
    assert_links_match_files(result, sc)

    # 4. Markdown and LaTeX come back as their text, not as object reprs.
    result, sc = await execute(client, MARKDOWN, sid)
    assert_ok(result, sc)
    assert sc["output"] == ["# hi *there*", "$\\displaystyle x^2$"], sc["output"]
    assert images(result) == [] and sc["files"] == []

    # 5. HTML-only output (an interactive plotly figure, an HTML object) is saved
    #    as display_N.html, listed and linked; the text of the table is the result.
    result, sc = await execute(client, HTML_ONLY, sid)
    assert_ok(result, sc)
    files = files_by_name(sc)
    html_files = sorted(files)
    assert html_files and all(n.startswith("display_") and n.endswith(".html") for n in html_files), files
    assert all(f["mime_type"] == "text/html" for f in files.values()), files
    for name in html_files:
        assert f"[HTML output saved as {name}]" in sc["output"], sc["output"]
    assert sc["result"] == "name\tn\nx & y\t1", sc["result"]
    assert not any(line.startswith("<") for line in sc["output"]), sc["output"]
    assert_links_match_files(result, sc)
    texts = []
    for name in html_files:
        rr = await client.read_resource(files[name]["uri"])
        assert isinstance(rr.contents[0], TextResourceContents)
        texts.append(rr.contents[0].text)
    assert any("plotly" in t.lower() for t in texts[:-1]), [t[:200] for t in texts]
    assert texts[-1] == "<table><tr><th>name</th><th>n</th></tr><tr><td>x &amp; y</td><td>1</td></tr></table>"

    # 6. An error, then the notebook: valid nbformat, every call in order.
    result, sc = await execute(client, "1/0", sid)
    assert sc["success"] is False
    result = await call(client, "export_notebook", {"session_id": sid})
    assert result.is_error is False
    sc = result.structured_content
    assert sc is not None and sc["success"] is True, sc
    ref = sc["file"]
    assert ref["name"] == "notebook_1.ipynb" and sc["cells"] == 6, sc
    links = [b for b in result.content if isinstance(b, ResourceLink)]
    assert [link.uri for link in links] == [ref["uri"]], result.content
    rr = await client.read_resource(ref["uri"])
    contents = rr.contents[0]
    assert isinstance(contents, TextResourceContents), contents
    assert contents.text == (data_dir / sid / "notebook_1.ipynb").read_text()
    nb = nbformat.reads(contents.text, as_version=4)
    nbformat.validate(nb)
    assert (nb.nbformat, nb.nbformat_minor) == (4, 5)
    cells = nb.cells
    assert [c.source for c in cells] == [SMALL_PLOT, BIG_PLOT, SIX_PLOTS, MARKDOWN, HTML_ONLY, "1/0"]
    assert [c.execution_count for c in cells] == [1, 2, 3, 4, 5, 6]
    pngs = [o for o in cells[0].outputs if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pngs) == 1, cells[0].outputs
    assert base64.b64decode(pngs[0].data["image/png"]) == (data_dir / sid / "figure_1.png").read_bytes()
    md = [o for o in cells[3].outputs if "text/markdown" in o.get("data", {})]
    assert md and md[0].data["text/markdown"] == "# hi *there*", cells[3].outputs
    results = [o for o in cells[4].outputs if o.output_type == "execute_result"]
    assert results and "text/html" in results[0].data, cells[4].outputs
    errors = [o for o in cells[5].outputs if o.output_type == "error"]
    assert errors and errors[0].ename == "ZeroDivisionError", cells[5].outputs

    # 7. A named export; the same name again is refused, nothing overwritten.
    result = await call(client, "export_notebook", {"session_id": sid, "name": "analysis"})
    assert result.structured_content["file"]["name"] == "analysis.ipynb", result.structured_content
    before = (data_dir / sid / "analysis.ipynb").read_bytes()
    await execute(client, "print('more')", sid)
    result = await call(client, "export_notebook", {"session_id": sid, "name": "analysis.ipynb"})
    assert result.is_error is True
    assert result.structured_content["message"].startswith("FileExistsError:"), result.structured_content
    assert (data_dir / sid / "analysis.ipynb").read_bytes() == before
    # The exported notebooks are not reported as files of the next call.
    result, sc = await execute(client, "1 + 1", sid)
    assert sc["files"] == [] and not [b for b in result.content if isinstance(b, ResourceLink)]


@pytest.mark.parametrize("transport", ["stdio", "http"])
def test_rich_results(transport: str, tmp_path: Path) -> None:
    data_dir = tmp_path / "sessions"
    data_dir.mkdir()
    run_with_server(transport, data_dir, rich_scenario)


async def inline_off_scenario(client: Client, data_dir: Path) -> None:
    result, sc = await execute(client, SMALL_PLOT, "")
    assert_ok(result, sc)
    assert images(result) == []
    assert [f["name"] for f in sc["files"]] == ["figure_1.png"]
    assert_links_match_files(result, sc)
    # The text block still carries the whole result for text-only clients.
    assert json.loads(result.content[0].text) == sc


def test_inline_images_can_be_turned_off(tmp_path: Path) -> None:
    data_dir = tmp_path / "sessions"
    data_dir.mkdir()
    run_with_server("stdio", data_dir, inline_off_scenario, ("--inline-images", "0"))
