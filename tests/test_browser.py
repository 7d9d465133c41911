"""Open a real report.html in headless Chromium: no console errors, every image loads, screenshot.

Needs Debian's ``chromium`` (``apt-get install -y chromium``); skipped cleanly without it. The
report itself has no JavaScript: the test adds a small probe script to a copy of it, which
records ``img.complete && img.naturalWidth > 0`` for every image and every error event into the
DOM, read back with ``--dump-dom``. A negative control (a broken image and a console error added
on purpose) proves the probe catches what it is meant to catch.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed (apt-get install -y chromium)")

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

PROBE = """<script>
window.__errs = [];
window.addEventListener('error', function (e) {
  window.__errs.push(String(e.message || (e.target && e.target.tagName) || 'error'));
}, true);
(function () {
  var orig = console.error;
  console.error = function () { window.__errs.push('console.error: ' + Array.from(arguments).join(' ')); orig.apply(console, arguments); };
})();
window.addEventListener('load', function () {
  var im = document.images, bad = 0;
  for (var i = 0; i < im.length; i++) { if (!(im[i].complete && im[i].naturalWidth > 0)) bad++; }
  var d = document.createElement('pre');
  d.id = 'fvsanity-probe';
  d.textContent = 'PROBE IMAGES=' + im.length + ' BROKEN=' + bad + ' ERRORS=' + window.__errs.length + ' END';
  document.body.appendChild(d);
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile{len(list(tmp_path.glob('profile*')))}"  # fresh user-data-dir per run
    return subprocess.run(
        [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=180,
    )


def _probe(html: Path, tmp_path: Path, extra: str = "") -> tuple[dict, list[str]]:
    """(counts from the probe, console lines other than the probe's) for a copy of ``html``."""
    text = html.read_text()
    assert text.count("<head>") == 1
    probed = html.with_name("probed_" + html.name)
    probed.write_text(text.replace("<head>", "<head>" + PROBE, 1).replace("</body>", extra + "</body>"))
    r = _chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    m = re.search(r"PROBE IMAGES=(\d+) BROKEN=(\d+) ERRORS=(\d+) END", r.stdout)
    assert m, f"probe output missing (rc {r.returncode}): {r.stderr[-2000:]}"
    console = [ln for ln in r.stderr.splitlines() if ":CONSOLE" in ln]
    return {"images": int(m.group(1)), "broken": int(m.group(2)), "errors": int(m.group(3))}, console


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A real report from a small audit of the tiny model."""
    from fvsanity.auditing import AuditSettings, run_audit
    from fvsanity.models import toy
    from fvsanity.testing import tiny_model

    tmp = tmp_path_factory.mktemp("browser")
    images = toy.write_procedural_folder(tmp / "imgs", per_class=3)
    cfg = AuditSettings.of(steps=6, seeds=2, top_k=3, n_other=8, n_boot=30, n_perm=30, paired_metrics=("cka",))
    lm = tiny_model(num_classes=10)
    lm.class_names = list(toy.CLASSES)  # the procedural folders are named by the toy's classes
    res = run_audit(lm, ["fc:0", "fc:3", "relu3:1", "relu2:4"], images, tmp / "out", cfg, progress=False)
    return res.report


def test_report_renders_without_errors_and_all_images_load(report, tmp_path):
    counts, console = _probe(report, tmp_path)
    n_img = report.read_text().count("<img ")
    assert n_img >= 4 * 4  # FVs, exemplars, profile per unit
    assert counts == {"images": n_img, "broken": 0, "errors": 0}
    assert console == [], console


def test_probe_catches_broken_images_and_console_errors(report, tmp_path):
    bad = '<img src="data:image/png;base64,AAAA" alt="broken"><script>console.error("on purpose")</script>'
    counts, console = _probe(report, tmp_path, extra=bad)
    assert counts["broken"] == 1 and counts["errors"] >= 1
    assert any("on purpose" in ln for ln in console)


def test_screenshot(report, tmp_path):
    shot = tmp_path / "report.png"
    r = _chromium(tmp_path, "--window-size=1200,1600", "--hide-scrollbars", f"--screenshot={shot}", report.as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1200, 1600)
        px = torch.tensor(list(im.convert("L").getdata()), dtype=torch.float32)
    # not blank: a white page with text, tables and images has real contrast
    assert px.std() > 20 and (px < 128).float().mean() > 0.01
    shutil.copy(shot, report.parent / "screenshot.png")


WIDTH_PROBE = """<script>
window.addEventListener('load', function () {
  var W = document.documentElement.clientWidth, wide = [];
  var all = document.body.getElementsByTagName('*');
  for (var i = 0; i < all.length; i++) {
    var el = all[i];
    if (el.closest('.tw') && el.closest('.tw') !== el) continue;  // inside a table's own scroll box
    var r = el.getBoundingClientRect();
    if (r.width > 0 && (r.right > W + 1 || r.left < -1)) wide.push(el.tagName + '.' + el.className);
  }
  var d = document.createElement('pre');
  d.id = 'fvsanity-width';
  d.textContent = 'WIDTH VIEW=' + W + ' PAGE=' + document.documentElement.scrollWidth + ' WIDE=' + wide.length
    + ' FIRST=' + (wide[0] || '-') + ' CARDS=' + document.querySelectorAll('.card').length
    + ' CARDTOP=' + Math.round((document.querySelector('.card') || {getBoundingClientRect: function () { return {top: -1}; }}).getBoundingClientRect().top) + ' END';
  document.body.appendChild(d);
});
</script>"""


def _width(report, tmp_path, extra: str = "") -> dict:
    text = report.read_text()
    probed = report.with_name("width_" + report.name)
    probed.write_text(text.replace("<head>", "<head>" + WIDTH_PROBE, 1).replace("</body>", extra + "</body>"))
    r = _chromium(tmp_path, "--window-size=1280,900", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    m = re.search(r"WIDTH VIEW=(\d+) PAGE=(\d+) WIDE=(\d+) FIRST=(\S+) CARDS=(\d+) CARDTOP=(-?\d+) END", r.stdout)
    assert m, r.stderr[-2000:]
    return dict(zip(("view", "page", "wide", "first", "cards", "top"), m.groups()))


def test_report_leads_with_unit_cards_and_fits_1280px(report, tmp_path):
    """The first screen holds one card per unit (FV thumbnails of every seed, exemplars, verdict
    badge); no element is wider than a 1280-px viewport (wide tables scroll inside their own box)."""
    w = _width(report, tmp_path)
    assert int(w["wide"]) == 0, f"{w['wide']} elements wider than the {w['view']}-px viewport, first {w['first']}"
    assert int(w["page"]) <= int(w["view"])  # the page never scrolls sideways
    assert int(w["cards"]) == 4 and 0 <= int(w["top"]) < 300  # one card per unit, on the first screen
    text = report.read_text()
    first = text.split('<div class="card">')[1]
    assert first.count("<img") >= 2 + 1 and 'class="badge' in first  # 2 FV seeds + exemplars, the verdict


def test_width_probe_catches_an_element_wider_than_the_viewport(report, tmp_path):
    w = _width(report, tmp_path, extra='<div style="width:3000px">wide on purpose</div>')
    assert int(w["wide"]) >= 1 and int(w["page"]) > int(w["view"])
