"""The website in a real browser: headless Chromium opens every page of the site `make site` builds.

Chromium is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`): no WebDriver, no port,
no download. Screenshots of every page land in `<site>/_screenshots/`. To check another build (the site
`make run` makes from the runs), point `MOEBOOK_SITE` at it: `MOEBOOK_SITE=_site pytest tests/test_site_browser.py`.
"""
import base64
import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import nbformat
import pytest

from conftest import NBS, notebooks
from moebook.site import build_site

pytestmark = pytest.mark.slow
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


class Chromium:
    "Headless Chromium with one tab, driven over the DevTools protocol: JSON messages ended by NUL on fds 3 (in) and 4 (out)."

    def __init__(self, exe: str, profile: Path, width: int = 1280, height: int = 900):
        cmd_r, self._w = os.pipe()  # we write commands, Chromium reads them on fd 3
        self._r, reply_w = os.pipe()  # Chromium writes replies and events on fd 4
        def child_fds():
            hi = [os.dup(fd) for fd in (cmd_r, reply_w)]  # out of the way of 3 and 4 before dup2
            os.dup2(hi[0], 3); os.dup2(hi[1], 4)
        self.proc = subprocess.Popen(
            [exe, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", f"--user-data-dir={profile}",
             "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio", "about:blank"],
            preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r); os.close(reply_w)
        self._id, self._buf, self._pending = 0, b"", []
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height, deviceScaleFactor=1, mobile=False)

    def _next(self, pred, timeout: float):
        deadline = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self._pending):
                if pred(m): return self._pending.pop(i)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]: raise TimeoutError(f"no answer from chromium in {timeout} s")
            chunk = os.read(self._r, 1 << 20)
            if not chunk: raise RuntimeError(f"chromium exited (code {self.proc.poll()})")
            *msgs, self._buf = (self._buf + chunk).split(b"\0")
            self._pending += [json.loads(m) for m in msgs]

    def send(self, method: str, session: bool = False, timeout: float = 60, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params, **({"sessionId": self.session} if session else {})}
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        reply = self._next(lambda m, i=self._id: m.get("id") == i, timeout)
        if "error" in reply: raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def open(self, url: str, timeout: float = 60):
        "Navigate and wait for the page's load event."
        self._pending.clear()
        self.send("Page.navigate", session=True, url=url)
        self._next(lambda m: m.get("method") == "Page.loadEventFired" and m.get("sessionId") == self.session, timeout)

    def evaluate(self, expression: str, timeout: float = 60):
        "The value of a JavaScript expression in the page (promises awaited)."
        r = self.send("Runtime.evaluate", session=True, timeout=timeout, expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r: raise RuntimeError(f"javascript failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def screenshot(self, path: Path):
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", session=True, format="png")["data"]))

    def close(self):
        with contextlib.suppress(Exception): self.send("Browser.close", timeout=10)
        try: self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired: self.proc.kill(); self.proc.wait()
        os.close(self._w); os.close(self._r)


# What a reader sees, read in the page once math is typeset. Selectors cover the nbconvert preview and Quarto.
PAGE_FACTS = """(async () => {
  if (window.MathJax && MathJax.Hub) await new Promise(done => MathJax.Hub.Queue(done));
  const all = sel => [...document.querySelectorAll(sel)];
  const texts = sel => all(sel).map(e => e.innerText);
  const h1 = document.querySelector("h1.title") || document.querySelector("main h1, .jp-Notebook h1");
  return {
    title: h1 ? h1.innerText.trim() : "", title_visible: !!h1 && h1.offsetHeight > 0 && h1.getBoundingClientRect().top < 400,
    doc_title: document.title, text: document.body.innerText,
    inputs: texts(".jp-InputArea-editor, div.sourceCode"),
    outputs: texts(".jp-OutputArea-output, .cell-output"),
    stderr: texts('[data-mime-type="application/vnd.jupyter.stderr"], .cell-output-stderr'),
    math: all(".MathJax, .MathJax_Display, mjx-container").length,
    math_errors: all(".MathJax_Error, merror, mjx-merror").length,
    raw_tex: texts(".jp-RenderedMarkdown, .jp-MarkdownOutput, main p").filter(t => /\\$[^$\\n]*\\\\[A-Za-z]+[^$\\n]*\\$/.test(t)),
    tables: all("table").length,
    nav: all("nav a[href]").map(a => a.href),
    images: document.images.length,
    broken_images: all("img").filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src.slice(0, 100)),
  };
})()"""

TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*\|", re.M)  # the |---|---| line of a markdown table
MATH = re.compile(r"\$\$.+?\$\$|(?<![\\$\w])\$[^$\s][^$\n]*?\\[A-Za-z]+[^$\n]*?\$", re.S)  # TeX between dollars


def _markdown_texts(nb):
    "Markdown a reader should see rendered: markdown cells and markdown outputs."
    for c in nb.cells:
        if c.cell_type == "markdown": yield c.source
        for o in c.get("outputs", []):
            if "text/markdown" in o.get("data", {}): yield o["data"]["text/markdown"]


def expected(nb_path: Path) -> dict:
    "What the page of `nb_path` must show, read independently from the source notebook."
    nb = nbformat.read(nb_path, as_version=4)
    md = "\n".join(_markdown_texts(nb))
    title = next(m[1].strip() for c in nb.cells if c.cell_type == "markdown" and (m := re.search(r"^#\s+(.+)$", c.source, re.M)))
    return {"title": title, "math": bool(MATH.search(md)), "table": bool(TABLE_RULE.search(md)),
            "images": sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)}


@pytest.fixture(scope="module")
def site(tmp_path_factory, request):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (`.ci/run` installs it: apt-get install chromium)")
    if os.environ.get("MOEBOOK_SITE"): return Path(os.environ["MOEBOOK_SITE"]).resolve()
    if shutil.which("quarto"): return build_site(out=tmp_path_factory.mktemp("browser") / "_site")  # what `make site` does
    return request.getfixturevalue("fallback_site")  # what `make site` builds without Quarto, shared with test_site.py


@pytest.fixture(scope="module")
def pages(site, tmp_path_factory):
    "Facts of every page, opened through the home page's sidebar links; screenshots saved under the site."
    shots = site / "_screenshots"
    shots.mkdir(exist_ok=True)
    browser = Chromium(CHROMIUM, tmp_path_factory.mktemp("chromium-profile"))
    try:
        browser.open((site / "index.html").as_uri())
        home = browser.evaluate(PAGE_FACTS)
        facts = {"index.html": home}
        for url in dict.fromkeys(home["nav"]):
            path = Path(url2pathname(urlparse(url).path))
            assert urlparse(url).scheme == "file" and path.is_file() and path.parent == site, f"sidebar link to nowhere: {url}"
            browser.open(url)
            facts[path.name] = browser.evaluate(PAGE_FACTS, timeout=120)
            browser.screenshot(shots / f"{path.stem}.png")
    finally:
        browser.close()
    return facts


def test_sidebar_reaches_every_page_and_is_the_same_everywhere(site, pages):
    on_disk = {p.name for p in site.glob("*.html")}
    assert set(pages) == on_disk == {f"{nb.stem}.html" for nb in notebooks()}
    for name, f in pages.items():
        assert {Path(urlparse(u).path).name for u in f["nav"]} == on_disk, f"{name}: its sidebar differs"


def test_every_page_has_a_visible_title_and_no_front_matter(pages):
    for nb in notebooks():
        f, title = pages[f"{nb.stem}.html"], expected(nb)["title"]  # the notebook's `# Title`
        assert f["title"] == title and f["title_visible"], f"{nb.name}: its title {title!r} is not its visible heading ({f['title']!r})"
        assert title in f["doc_title"], f"{nb.name}: the browser tab says {f['doc_title']!r}"
        raw = re.findall(r"(?:^|---\s*)(?:title|description|output-file):\s.{0,60}", f["text"], re.M)
        assert not raw, f"{nb.name}: front matter printed as text: {raw[:3]}"


def test_no_cell_directives_shown(pages):
    for name, f in pages.items():
        shown = [l for t in f["inputs"] for l in t.splitlines() if l.lstrip().startswith("#|")]
        assert not shown, f"{name}: `#|` lines shown as code: {shown[:3]}"


def test_no_stderr_noise_or_machine_paths(pages):
    for name, f in pages.items():
        assert len(f["stderr"]) <= 2 and all(t.count("\n") < 10 for t in f["stderr"]), f"{name}: stderr shown: {f['stderr'][:2]}"
        paths = [m[0] for t in f["outputs"] for m in re.finditer(r"\S*/(?:site-packages|\.venv)/\S*", t)]
        assert not paths, f"{name}: machine paths shown: {paths[:2]}"
        noise = [l for t in f["outputs"] for l in t.splitlines() if re.search(r"\b\w*Warning: |\bWARNING\b", l)]
        assert not noise, f"{name}: library warnings shown: {noise[:2]}"


def test_math_is_typeset(pages):
    with_math = [nb for nb in notebooks() if expected(nb)["math"]]
    assert len(with_math) >= 3, "the check would be empty: the notebooks have math"
    for nb in with_math:
        f = pages[f"{nb.stem}.html"]
        assert f["math"] > 0 and f["math_errors"] == 0, f"{nb.name}: math not typeset ({f['math']} formulas, {f['math_errors']} errors)"
        assert not f["raw_tex"], f"{nb.name}: TeX left as text: {f['raw_tex'][0][:200]}"


def test_markdown_tables_are_rendered(pages):
    with_tables = [nb for nb in notebooks() if expected(nb)["table"]]
    assert len(with_tables) >= 3, "the check would be empty: the notebooks have tables"
    for nb in with_tables:
        assert pages[f"{nb.stem}.html"]["tables"] > 0, f"{nb.name}: its markdown tables are not rendered"
    # a table printed as markdown source (its cell needs `#| output: asis`)
    raw = {name: t[:120] for name, f in pages.items() for t in f["outputs"] if TABLE_RULE.search(t)}
    assert not raw, f"markdown tables shown as text: {raw}"


def test_images_load(pages):
    for nb in notebooks():
        f = pages[f"{nb.stem}.html"]
        assert f["images"] >= expected(nb)["images"], f"{nb.name}: figures missing"
        assert not f["broken_images"], f"{nb.name}: images that do not load: {f['broken_images']}"


def test_screenshots_saved(site, pages):
    for name in pages:
        png = site / "_screenshots" / name.replace(".html", ".png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, f"{png}: no screenshot"
