"""The proxy's own pages in a real headless Chromium at phone size, driven over the DevTools protocol: the locked
instance, its form, the setup link landing on the sign-up page with the cookie set, and every waiting or failure
page, each screenshotted into the test's tmp dir (look at them: `pytest --basetemp=DIR`).

Chromium comes from Debian's packages (`apt-get install chromium`; `.ci/run` installs it in CI); without it the
test is skipped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import shutil
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from shared.serving.guard import COOKIE, SIGNUP_PATH, OwnerGuard
from shared.serving.pages import PAGES, REFRESH
from shared.serving.proxy import Proxy
from tests.harness import Standin, free_port, serve_asgi
from tests.test_pages import SETUP, make_server

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it when CI is set)",
)
PHONE = (390, 844, 2)  # CSS px width, height, device pixel ratio


class Page:
    """One browser tab over the DevTools protocol (a flat session on the browser's websocket)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.session: str | None = None  # None: commands go to the browser itself
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.loads = 0  # Page.loadEventFired seen so far
        self._loaded = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = msg.json()
            if "id" in data and data["id"] in self._waiting:
                self._waiting.pop(data["id"]).set_result(data)
            elif data.get("method") == "Page.loadEventFired":
                self.loads += 1
                self._loaded.set()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        n = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[n] = future
        message: dict[str, Any] = {"id": n, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        await self.ws.send_json(message)
        reply = await asyncio.wait_for(future, 20)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def wait_load(self, after: int, timeout: float) -> None:
        """Until more than `after` loads have fired."""
        deadline = time.monotonic() + timeout
        while self.loads <= after:
            self._loaded.clear()
            left = deadline - time.monotonic()
            assert left > 0, "the page did not load"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._loaded.wait(), left)

    async def open(self, url: str) -> None:
        before = self.loads
        result = await self.call("Page.navigate", url=url)
        assert not result.get("errorText"), result
        await self.wait_load(before, 15)

    async def js(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        return result["result"].get("value")

    async def text(self) -> str:
        return " ".join((await self.js("document.body.innerText")).split())

    async def screenshot(self, path: Path) -> tuple[int, int]:
        data = base64.b64decode((await self.call("Page.captureScreenshot", format="png"))["data"])
        path.write_bytes(data)
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", data[16:24])
        return width, height


@contextlib.asynccontextmanager
async def chromium(tmp: Path) -> AsyncIterator[Page]:
    """A headless Chromium with one phone-sized tab."""
    profile = tmp / "profile"
    args = [
        str(CHROMIUM),
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        f"--window-size={PHONE[0]},{PHONE[1]}",
        "about:blank",
    ]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (active.exists() and len(active.read_text().split()) == 2):
            assert proc.poll() is None, f"chromium exited with {proc.returncode}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            await asyncio.sleep(0.05)
        port, path = active.read_text().split()
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0) as ws,
        ):
            page = Page(ws)  # browser-level commands first, then the tab's session
            target = (await page.call("Target.createTarget", url="about:blank"))["targetId"]
            attached = await page.call("Target.attachToTarget", targetId=target, flatten=True)
            page.session = attached["sessionId"]
            await page.call("Page.enable")
            await page.call(
                "Emulation.setDeviceMetricsOverride",
                width=PHONE[0],
                height=PHONE[1],
                deviceScaleFactor=PHONE[2],
                mobile=True,
            )
            try:
                yield page
            finally:
                page._reader.cancel()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(10)


async def shoot(page: Page, tmp: Path, name: str, *texts: str) -> str:
    """Screenshot the current page (checked: a PNG of the phone's size, not blank) and check its visible text."""
    png = tmp / f"{name}.png"
    assert await page.screenshot(png) == (PHONE[0] * PHONE[2], PHONE[1] * PHONE[2])
    assert png.stat().st_size > 15_000, f"{png} looks empty ({png.stat().st_size} bytes)"
    text = await page.text()
    for t in texts:
        assert t in text, (name, t, text)
    # Readable on a phone: the page fits the width (no sideways scrolling) and the text is not tiny.
    assert await page.js("document.documentElement.scrollWidth <= window.innerWidth"), name
    assert await page.js("parseFloat(getComputedStyle(document.body).fontSize) >= 16"), name
    return text


def test_pages_in_a_real_browser(tmp_path, no_modal_env):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    lease = "restore of 20260101T000000Z by alice"
    server = make_server(tmp_path / "server", maintenance_check=lambda: lease, maintenance_recheck=3600)
    assert server.start() is False and server.state == "maintenance"  # a held lease: Tabby never starts here

    async def scenario() -> None:
        with Standin(tmp_path / "root") as tabby:
            guard = OwnerGuard(Proxy(tabby.url), tmp_path / "root/ee/db.sqlite", SETUP)
            async with (
                chromium(tmp_path) as page,
                serve_asgi(guard) as url,
                serve_asgi(server.app()) as gated,
                serve_asgi(Proxy(f"http://127.0.0.1:{free_port()}")) as dead,
            ):
                # The locked instance, then its form with a wrong token.
                await page.open(url + "/")
                await shoot(page, shots, "locked", PAGES["locked"].title, f"{url}/_setup?token=<setup token>")
                before = page.loads
                await page.js(
                    "document.querySelector('input[name=token]').value = 'not-the-token';"
                    "document.querySelector('form').requestSubmit()"
                )
                await page.wait_load(before, 10)
                assert await page.js("location.href") == f"{url}/_setup?token=not-the-token"
                await shoot(page, shots, "wrong_token", PAGES["wrong_token"].title)
                # The setup link: cookie set (HttpOnly), and the browser lands on Tabby's sign-up page.
                await page.open(f"{url}/_setup?token={SETUP}")
                assert await page.js("location.href") == url + SIGNUP_PATH
                assert "stand-in /auth/signup" in await page.text()
                cookies = (await page.call("Network.getCookies", urls=[url + "/"]))["cookies"]
                claim = [c for c in cookies if c["name"] == COOKIE]
                assert claim and claim[0]["httpOnly"] and claim[0]["sameSite"] == "Lax"
                await page.screenshot(shots / "signup.png")

                await page.open(gated + "/")
                await shoot(page, shots, "maintenance", PAGES["maintenance"].title, lease)
                # Starting: the page reloads itself and then shows what came next.
                server.state = "starting"
                await page.open(gated + "/")
                await shoot(page, shots, "starting", PAGES["starting"].title, "reloads every 5 seconds")
                before = page.loads
                server.state, server.reason = "failed", "tabby exited with code 9 before listening"
                await page.wait_load(before, REFRESH + 5)
                await shoot(
                    page, shots, "failed", PAGES["failed"].title, "exited with code 9 before listening"
                )

                for state, reason, kind in [
                    ("restarting", "it exited with code 3", "restarting"),
                    ("gave_up", "it crashed 6 times within 600s; the server exits", "gave_up"),
                    ("superseded", "its data dir /data was replaced", "superseded"),
                    ("failed", "TABBY_WEBSERVER_JWT_TOKEN_SECRET is not a UUID", "bad_secret"),
                    ("stopping", None, "stopping"),
                ]:
                    server.state, server.reason = state, reason
                    await page.open(gated + "/")
                    await shoot(page, shots, kind, PAGES[kind].title, *([reason] if reason else []))
                await page.open(dead + "/")
                await shoot(
                    page, shots, "upstream", PAGES["upstream"].title, "upstream refused the connection"
                )

    started = time.monotonic()
    asyncio.run(asyncio.wait_for(scenario(), 90))
    print(f"\nbrowser pages: {time.monotonic() - started:.1f}s, screenshots in {shots}")
    assert len(list(shots.glob("*.png"))) == 12
