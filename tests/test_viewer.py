"""The offline HTML viewer: page structure, and a real headless Chromium that loads it offline.

The browser test drives Chromium through the DevTools protocol over ``--remote-debugging-pipe``
(NUL-separated JSON on file descriptors 3 and 4), so it needs only the standard library. It skips
when no Chromium is installed, unless ``BRAINFV_REQUIRE_BROWSER=1`` (CI), where it fails instead.
Set ``BRAINFV_TEST_ARTIFACTS=<dir>`` to keep the page and its screenshots for a look.
"""
import base64
import io
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from brainfv.data.grid import Grid
from brainfv.errors import InputDataError
from brainfv.report.viewer import parse_view, repack_png, write_viewer

GRID = Grid.from_bbox(6.0, [[-78, 78], [-114, 78], [-72, 84]])  # 26 x 32 x 26 voxels, MNI space
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _blob(ijk, amp=2.0, sigma=1.5):
    idx = np.indices(GRID.shape).transpose(1, 2, 3, 0)
    return (amp * np.exp(-((idx - np.asarray(ijk)) ** 2).sum(-1) / (2 * sigma ** 2))).astype(np.float32)


def _units(seed=0):
    rng = np.random.default_rng(seed)
    def noise(s):
        return (s * rng.standard_normal(GRID.shape)).astype(np.float32)
    return [
        {"label": "block4.norm:0",
         "panels": {"none": _blob((8, 18, 15)) + noise(0.3), "tv": -_blob((8, 18, 15)) + noise(0.1),
                    "exemplar": None, "attribution": 1e-3 * (_blob((8, 18, 15)) + noise(0.2))}},
        {"label": "block4.norm:1", "cut_coords": (18.0, -30.0, 12.0),
         "panels": {"none": _blob((16, 14, 14)) + noise(0.3), "tv": _blob((16, 14, 14)) + noise(0.1),
                    "exemplar": noise(1.0), "attribution": None}},
    ]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    path = tmp_path_factory.mktemp("viewer") / "viewer.html"
    out = write_viewer(path, "lesion — block4.norm <test>", _units(), GRID, description="two units & a gap")
    return path, out


_FETCHING = [
    re.compile(r"""(?:src|href|action|poster|srcset)\s*=\s*["']?\s*(?:https?:|ftp:|wss?:)?//""", re.I),
    re.compile(r"""url\(\s*["']?\s*(?:https?:)?//""", re.I),
    re.compile(r"""@import|\bfetch\(|XMLHttpRequest|new\s+WebSocket|importScripts""", re.I),
]


def test_page_is_one_self_contained_file(page):
    path, out = page
    text = path.read_text(encoding="utf-8")
    assert out.mode == "shared" and out.n_views == 6 and out.n_bytes == len(text.encode())
    for pattern in _FETCHING:  # nothing the browser would fetch from elsewhere
        assert not pattern.search(text), pattern.pattern
    assert "&lt;test&gt;" in text and "two units &amp; a gap" in text  # title/description escaped
    data = json.loads(re.search(r'<script id="brainfv-data" type="application/json">(.*?)</script>',
                                text, re.S).group(1))
    views = [p["view"] for u in data["units"] for p in u["panels"] if p["view"]]
    assert len(views) == 6
    assert len({v["sprite"] for v in views}) == 1  # the template sprite is stored once
    assert all(v["overlay"] in data["assets"] and v["sprite"] in data["assets"] for v in views)
    assert data["units"][1]["cut"] == [18.0, -30.0, 12.0]  # a given cut is kept
    ijk = GRID.voxel_coords(data["units"][0]["cut"])  # a chosen one lands on the blob
    assert np.all(np.abs(ijk - (8, 18, 15)) <= 1)
    legends = [p.get("units", "") + " " + p["caption"] for p in data["units"][0]["panels"]]
    assert "z-scored T1" in legends[0] and "integrated gradients" in legends[3] and "robust max" in legends[3]
    assert data["units"][0]["panels"][2]["view"] is None  # missing exemplar: an empty, labelled box


def test_iframe_mode_is_the_larger_baseline(tmp_path, page):
    out = write_viewer(tmp_path / "iframe.html", "t", _units()[:1], GRID, mode="iframe")
    one_unit_shared = write_viewer(tmp_path / "shared.html", "t", _units()[:1], GRID)
    assert out.mode == "iframe" and out.n_views == 3
    assert out.n_bytes > 1.5 * one_unit_shared.n_bytes
    text = (tmp_path / "iframe.html").read_text()
    assert text.count("function brainsprite") >= 3  # each embedded nilearn page carries its libraries


def test_parse_view_and_repack_png():
    from nilearn import plotting
    from PIL import Image

    vol = _blob((13, 16, 13))
    bg = GRID.to_nifti(1 + _blob((13, 16, 13), amp=1.0, sigma=6.0))
    parsed = parse_view(plotting.view_img(GRID.to_nifti(vol), bg_img=bg, threshold=0.2).get_standalone())
    assert parsed is not None and "function brainsprite" in parsed["library"]
    overlay = parsed["images"][parsed["params"]["overlay"]["sprite"]]
    small = repack_png(overlay)
    assert len(small) <= len(overlay)
    def decode(b):
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGBA"))
    assert np.array_equal(decode(small), decode(overlay))  # exact, only smaller
    assert parse_view("<html><body>not a nilearn page</body></html>") is None


def test_write_viewer_validates(tmp_path):
    with pytest.raises(InputDataError, match="'label' and 'panels'"):
        write_viewer(tmp_path / "v.html", "t", [{"panels": {}}], GRID)
    with pytest.raises(InputDataError, match="shape"):
        write_viewer(tmp_path / "v.html", "t", [{"label": "u", "panels": {"tv": np.zeros((2, 2, 2))}}], GRID)
    assert not (tmp_path / "v.html").exists()


# --------------------------------------------------------------------------- a real browser


def _find_browser():
    exe = os.environ.get("BRAINFV_CHROMIUM")
    if exe:
        return shutil.which(exe)  # None (-> skip or fail, with the reason) if it is not an executable
    for name in BROWSERS:
        if shutil.which(name):
            return shutil.which(name)
    return None


class DevTools:
    """A headless Chromium driven over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: out)."""

    def __init__(self, exe, profile, timeout=60.0):
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()

        def child_fds():  # the protocol's fixed descriptors, in the child only
            a, b = os.dup(cmd_r), os.dup(out_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.stderr = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-pipe", f"--user-data-dir={profile}", "--no-first-run",
             "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-extensions", "--disable-default-apps", "--mute-audio",
             "--hide-scrollbars", "--window-size=1400,1000", "--enable-logging=stderr", "--v=0",
             "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
            pass_fds=(3, 4), preexec_fn=child_fds)
        os.close(cmd_r)
        os.close(out_w)
        self.timeout, self._buf, self._id, self.events = timeout, b"", 0, []

    def send(self, method, session=None, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self._id:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)

    def wait_event(self, method, timeout=30.0):
        deadline = time.monotonic() + timeout
        seen = len(self.events)
        while True:
            for m in self.events[seen:]:
                if m.get("method") == method:
                    return m
            seen = len(self.events)
            self.events.append(self._read(deadline))

    def _read(self, deadline):
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._out_r], [], [], left)[0]:
                raise TimeoutError(f"no answer from Chromium in time; its stderr ends:\n{self.stderr_tail()}")
            chunk = os.read(self._out_r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe; its stderr ends:\n{self.stderr_tail()}")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def stderr_tail(self, n=2000):
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-n:]

    def close(self):
        try:
            os.write(self._cmd_w, json.dumps({"id": 0, "method": "Browser.close", "params": {}}).encode() + b"\0")
            self.proc.wait(timeout=10)
        except Exception:
            self.proc.kill()
            self.proc.wait()
        finally:
            os.close(self._cmd_w)
            os.close(self._out_r)
            self.stderr.close()


def _evaluate(dt, session, expression):
    r = dt.send("Runtime.evaluate", session, expression=expression, returnByValue=True, awaitPromise=True)
    if "exceptionDetails" in r:
        raise AssertionError(f"page script failed: {r['exceptionDetails']}")
    return r["result"].get("value")


def _wait_ready(dt, session, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _evaluate(dt, session, "!!(window.brainfv && window.brainfv.ready)"):
            return
        time.sleep(0.1)
    raise AssertionError("the viewer did not finish building its panels")


# What each visible viewer canvas shows: pixels that are not background, and overlay-coloured ones
_CANVAS_STATS = """(() => {
  const sec = document.querySelector("section.unit.active");
  return Array.from(sec.querySelectorAll(".panel")).map(box => {
    const c = box.querySelector("canvas");
    if (!c) return {name: box.querySelector("h3").textContent, canvas: false};
    const d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
    let lit = 0, coloured = 0;
    for (let i = 0; i < d.length; i += 4) {
      const r = d[i], g = d[i + 1], b = d[i + 2];
      if (r + g + b > 30) lit++;
      if (Math.max(r, g, b) - Math.min(r, g, b) > 60) coloured++;
    }
    return {name: box.querySelector("h3").textContent, canvas: true, w: c.width, h: c.height,
            lit: lit / (c.width * c.height), coloured: coloured / (c.width * c.height)};
  });
})()"""


def _problems(events):
    """Console errors, uncaught exceptions, and requests for anything but the file itself.

    Warnings are not failures (Chromium warns e.g. that brainsprite's repeated getImageData would be
    faster with willReadFrequently); the test prints them.
    """
    bad = []
    for m in events:
        method, p = m.get("method"), m.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            bad.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description")))
                                                          for a in p.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            bad.append(f"exception: {p['exceptionDetails'].get('exception', {}).get('description')}")
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            bad.append(f"log {p['entry']['level']}: {p['entry']['text']} {p['entry'].get('url', '')}")
        elif method == "Network.requestWillBeSent":
            url = p["request"]["url"]
            if not url.startswith(("file://", "data:", "about:", "blob:")):
                bad.append(f"network request: {url}")
        elif method == "Network.loadingFailed":
            bad.append(f"failed load: {p.get('errorText')}")
    return bad


def test_viewer_in_headless_chromium(page, tmp_path):
    exe = _find_browser()
    if exe is None:
        msg = ("no Chromium found (looked for $BRAINFV_CHROMIUM, else " + ", ".join(BROWSERS) +
               " on PATH); install it with `apt-get install chromium` to run the browser test")
        if os.environ.get("BRAINFV_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + " — BRAINFV_REQUIRE_BROWSER=1 requires it")
        pytest.skip(msg)
    path, _ = page
    artifacts = Path(os.environ.get("BRAINFV_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    dt = DevTools(exe, tmp_path / "profile")
    try:
        target = dt.send("Target.createTarget", url="about:blank")["targetId"]
        s = dt.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            dt.send(f"{domain}.enable", s)
        # offline: any request would fail (and be reported by requestWillBeSent anyway)
        dt.send("Network.emulateNetworkConditions", s, offline=True, latency=0, downloadThroughput=-1,
                uploadThroughput=-1)
        dt.send("Page.navigate", s, url=path.resolve().as_uri())
        dt.wait_event("Page.loadEventFired")
        _wait_ready(dt, s)

        def check_unit(u, names, missing):
            stats = _evaluate(dt, s, _CANVAS_STATS)
            assert [st["name"] for st in stats] == names
            for st in stats:
                if st["name"] in missing:
                    assert not st["canvas"], st  # an empty, labelled box
                    continue
                assert st["canvas"] and st["w"] > 300 and st["h"] > 100, st
                assert st["lit"] > 0.05, f"unit {u}, panel {st['name']}: blank canvas {st}"
                if st["name"] != "exemplar":
                    assert st["coloured"] > 0.002, f"unit {u}, panel {st['name']}: no overlay {st}"
            shot = dt.send("Page.captureScreenshot", s, format="png")["data"]
            (artifacts / f"viewer-unit{u}.png").write_bytes(base64.b64decode(shot))
            return stats

        names = ["none", "tv", "exemplar", "attribution"]
        check_unit(0, names, {"exemplar"})
        # linked crosshairs: a click in the first viewer's axial view moves every viewer of the unit
        before = _evaluate(dt, s, "window.brainfv.built[0].map(b => [b.numSlice.X, b.numSlice.Y, b.numSlice.Z])")
        box = _evaluate(dt, s, """(() => { const r = document.querySelector("section.unit.active canvas")
                                   .getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()""")
        x, y = box[0] + box[2] * 0.80, box[1] + box[3] * 0.30
        for kind in ("mousePressed", "mouseReleased"):
            dt.send("Input.dispatchMouseEvent", s, type=kind, x=x, y=y, button="left", clickCount=1)
        after = _evaluate(dt, s, "window.brainfv.built[0].map(b => [b.numSlice.X, b.numSlice.Y, b.numSlice.Z])")
        assert after[0] != before[0] and all(a == after[0] for a in after), (before, after)
        # the next unit's viewers are built on demand (keyboard navigation)
        dt.send("Input.dispatchKeyEvent", s, type="keyDown", key="ArrowDown", code="ArrowDown",
                windowsVirtualKeyCode=40)
        dt.send("Input.dispatchKeyEvent", s, type="keyUp", key="ArrowDown", code="ArrowDown",
                windowsVirtualKeyCode=40)
        time.sleep(0.1)
        _wait_ready(dt, s)
        assert _evaluate(dt, s, "window.brainfv.current") == 1
        check_unit(1, names, {"attribution"})
        cut = _evaluate(dt, s, "window.brainfv.built[1].map(b => [b.numSlice.X, b.numSlice.Y, b.numSlice.Z])")
        assert all(c == cut[0] for c in cut)  # all panels open at the unit's one cut
        assert _evaluate(dt, s, "window.brainfv.errors") == []
        # drain what arrived after the last command, then judge the whole session
        try:
            dt.wait_event("never.happens", timeout=0.5)
        except TimeoutError:
            pass
        warnings = {m["params"]["entry"]["text"][:100] for m in dt.events
                    if m.get("method") == "Log.entryAdded" and m["params"]["entry"]["level"] == "warning"}
        if warnings:
            print("browser warnings (not failures):", *sorted(warnings), sep="\n  ")
        problems = _problems(dt.events)
        assert not problems, "\n".join(problems)
        requests = [m["params"]["request"]["url"][:40] for m in dt.events
                    if m.get("method") == "Network.requestWillBeSent"]
        assert requests and requests[0].startswith("file://")  # the monitor saw the page load itself
    finally:
        dt.close()
    print(f"browser test: {time.monotonic() - t0:.1f} s in {exe}; screenshots in {artifacts}")


def check_page_in_browser(path, artifacts):
    """Open a viewer page the study wrote in headless Chromium, offline: no console errors or requests, and
    its first unit's panels show anatomy (skips without Chromium unless BRAINFV_REQUIRE_BROWSER=1)."""
    exe = _find_browser()
    if exe is None:
        if os.environ.get("BRAINFV_REQUIRE_BROWSER") == "1":
            pytest.fail("BRAINFV_REQUIRE_BROWSER=1 but no Chromium found")
        print("no Chromium: the study's viewer page was not opened in a browser")
        return
    artifacts = Path(artifacts)
    artifacts.mkdir(parents=True, exist_ok=True)
    dt = DevTools(exe, artifacts / "profile")
    try:
        target = dt.send("Target.createTarget", url="about:blank")["targetId"]
        s = dt.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            dt.send(f"{domain}.enable", s)
        dt.send("Network.emulateNetworkConditions", s, offline=True, latency=0, downloadThroughput=-1,
                uploadThroughput=-1)
        dt.send("Page.navigate", s, url=Path(path).resolve().as_uri())
        dt.wait_event("Page.loadEventFired")
        _wait_ready(dt, s)
        stats = _evaluate(dt, s, _CANVAS_STATS)
        drawn = [st for st in stats if st.get("canvas")]
        assert drawn and all(st["lit"] > 0.05 for st in drawn), stats
        (artifacts / "study-viewer.png").write_bytes(base64.b64decode(
            dt.send("Page.captureScreenshot", s, format="png")["data"]))
        try:
            dt.wait_event("never.happens", timeout=0.5)
        except TimeoutError:
            pass
        problems = _problems(dt.events)
        assert not problems, "\n".join(problems)
    finally:
        dt.close()
