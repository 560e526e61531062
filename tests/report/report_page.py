"""Reading `bitvla replay --html` pages as a browser and as a parser would (shared by the bag and
the simulated-arm tests).

- `parse(path)`: the page's charts (each <figure data-chart> with the series it declares and, read
  from its SVG, the points drawn in each series' colour), the ids on the page, the thumbnails and
  the embedded JSON report. Nothing here trusts the declared counts: callers compare the points
  drawn with counts read from the bags by rosbags.
- `render(path, screenshot)`: the page in headless Chromium (Debian's package): the console
  messages it logged, the DOM after its load handler ran, and a screenshot.
"""

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser


class _Page(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.figures = {}
        self.ids = set()
        self.images = []
        self.strip_calls = None
        self.json_text = None
        self._figure = None
        self._in_json = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "figure" and "data-chart" in a:
            self._figure = {"series": json.loads(a["data-series"]), "polylines": [], "circles": [], "svg": 0}
            self.figures[a["data-chart"]] = self._figure
        elif self._figure is not None and tag == "svg":
            self._figure["svg"] += 1
        elif self._figure is not None and tag == "polyline":
            self._figure["polylines"].append((a.get("stroke", "").upper(), len(a.get("points", "").split())))
        elif self._figure is not None and tag == "circle":
            self._figure["circles"].append(a.get("fill", "").upper())
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "div" and "strip" in a.get("class", "").split():
            self.strip_calls = int(a["data-calls"])
        elif tag == "script" and a.get("id") == "report-json":
            self._in_json = True

    def handle_endtag(self, tag):
        if tag == "figure":
            self._figure = None
        elif tag == "script":
            self._in_json = False

    def handle_data(self, data):
        if self._in_json:
            self.json_text = (self.json_text or "") + data


def parse(path):
    text = open(path, encoding="utf-8").read()
    p = _Page()
    p.feed(text)
    p.close()
    page = {"text": text, "ids": p.ids, "images": p.images, "strip_calls": p.strip_calls,
            "report": json.loads(p.json_text.replace("<\\/", "</")) if p.json_text else None, "charts": {}}
    for name, f in p.figures.items():
        drawn = {}
        for s in f["series"]:
            colour = s["colour"].upper()
            lines = [n for c, n in f["polylines"] if c == colour]
            drawn[s["name"]] = {"declared": s["points"], "points": sum(lines) + f["circles"].count(colour),
                                "polylines": len(lines), "colour": colour}
        page["charts"][name] = {"svg": f["svg"], "series": drawn, "polylines": f["polylines"]}
    return page


def polylines_of(chart, colour):
    """Polylines of one colour in a parsed chart (markers: chunk boundaries, instructions)."""
    return [n for c, n in chart["polylines"] if c == colour.upper()]


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def browser_required():
    return os.environ.get("BITVLA_REQUIRE_BROWSER") == "1"


def render(path, screenshot, size=(1150, 2400)):
    """(console lines, DOM after load) of the page in headless Chromium, and a screenshot."""
    exe = chromium()
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--enable-logging=stderr", "--v=0"]
    url = "file://" + os.path.abspath(path)
    p = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise AssertionError(f"chromium exited {p.returncode}: {p.stderr[-2000:]}")
    console = [line for line in p.stderr.splitlines() if ":CONSOLE" in line]
    s = subprocess.run(flags + [f"--window-size={size[0]},{size[1]}", f"--screenshot={screenshot}", url],
                       capture_output=True, text=True, timeout=120)
    if s.returncode != 0 or not os.path.exists(screenshot):
        raise AssertionError(f"chromium could not take a screenshot: {s.stderr[-2000:]}")
    return console, p.stdout


def decoded_images(dom):
    """The page's own count of images the browser decoded: (decoded, total)."""
    m = re.search(r'data-images-decoded="(\d+)/(\d+)"', dom)
    if not m:
        raise AssertionError("the page's load handler did not run (no data-images-decoded)")
    return int(m.group(1)), int(m.group(2))


def check_in_browser(path, screenshot, expected_images):
    """The page loads in Chromium with no console message, every image decodes, and the
    screenshot is not blank. Returns the DOM, or None where there is no browser (an error under
    BITVLA_REQUIRE_BROWSER=1)."""
    if chromium() is None:
        if browser_required():
            raise AssertionError("no chromium, and BITVLA_REQUIRE_BROWSER=1 (scripts/setup_browser.sh installs it)")
        print("  SKIPPED the browser check: no chromium (scripts/setup_browser.sh installs it)")
        return None
    console, dom = render(path, screenshot)
    assert not console, f"console messages while loading {path}: {console}"
    decoded, total = decoded_images(dom)
    assert decoded == total == expected_images, \
        f"{path}: the browser decoded {decoded} of {total} images, expected {expected_images}"

    from PIL import Image, ImageStat
    img = Image.open(screenshot).convert("L")
    assert img.size[0] >= 1000, img.size
    assert ImageStat.Stat(img).stddev[0] > 10, "the screenshot is blank"
    return dom
