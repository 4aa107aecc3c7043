"""The report in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``) driven by Selenium through the system chromedriver, pages opened from
``file://``. No console errors, every image decoded, every link resolving, the K selector and
the sortable fits table working, and nothing wider than the window at 400 and 1400 px."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml
from conftest import unavailable

from kmdask.batch import rundir

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

# small: two fits, a multi-K clusters figure (the K selector) and a chart
JOB = {
    "job": "web",
    "data": {"store": None, "split": "train"},
    "fits": [
        {"name": "scal", "algorithm": "scalable", "rows": 300, "k": [2, 3], "trials": 2,
         "iterations": 20},
        {"name": "mcc", "algorithm": "mccaffrey", "rows": 100, "k": 3, "iterations": 10,
         "trials": 5},
    ],
    "figures": [
        {"name": "K", "kind": "clusters", "fits": ["scal"], "per_cluster": 10},
        {"name": "demo", "kind": "clusters", "fits": ["mcc"], "samples": 100},
        {"name": "elbow", "kind": "elbow", "fits": ["scal"]},
    ],
}
CRITERIA = {2: {"silhouette": 0.21, "davies_bouldin": 1.9},
            3: {"silhouette": 0.17, "davies_bouldin": 2.3}}


@pytest.fixture(scope="module")
def report(tmp_path_factory, mnist_store) -> Path:
    """A real small run, given choosing-K criteria on one fit (newer runs hold them in
    ``result.json``; the other fit has none, as older runs), and its report."""
    work = tmp_path_factory.mktemp("browserrun")
    (work / "cluster.yaml").write_text(yaml.safe_dump({
        "default": "local",
        "profiles": {"local": {"kind": "local", "n_workers": 1, "threads_per_worker": 2,
                               "memory_limit": "2GiB"}}}))
    job = json.loads(json.dumps(JOB))
    job["data"]["store"] = str(mnist_store)
    (work / "web.yaml").write_text(yaml.safe_dump(job))
    env = dict(os.environ, XDG_CACHE_HOME=str(work / "xdg"), KMDASK_MIRRORS="",
               KMDASK_NO_PYPI="1")
    r = subprocess.run([sys.executable, "-m", "kmdask", "run", "web.yaml", "-q",
                        "--cluster-file", "cluster.yaml"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    run = work / "run"
    shutil.copytree(work / r.stdout.strip(), run, symlinks=True)
    for k, crit in CRITERIA.items():
        path = rundir.fit_dir(run, "scal", k) / "result.json"
        rundir.write_json(path, {**json.loads(path.read_text()), "criteria": crit})
    rundir.seal(run)
    from kmdask.report.build import write_report

    return write_report([run], work / "report").parent


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for the module, through the system chromedriver: the Service
    path is given, so Selenium Manager (which would download a driver) is never run."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        unavailable("chromium and chromium-driver are not installed (apt-get install chromium "
                    "chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install -e '.[test]')")
    mp = pytest.MonkeyPatch()
    mp.setenv("SE_OFFLINE", "true")  # belt and braces: no Selenium Manager network access
    mp.setenv("SE_AVOID_BROWSER_DOWNLOAD", "true")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--allow-file-access-from-files", "--hide-scrollbars", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()
    mp.undo()


def _open(driver, path: Path, width: int = 1400) -> None:
    driver.set_window_size(width, 1000)
    driver.get(path.as_uri())
    driver.get_log("browser")  # what was logged before this page is not its fault


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


_IMAGES = """
const done = arguments[arguments.length - 1];
const imgs = Array.from(document.images);
imgs.forEach(i => { i.loading = 'eager'; });  // lazy images off screen would never load
Promise.all(imgs.map(i => i.decode().then(() => null,
                                          () => i.getAttribute('src'))))
  .then(bad => done({n: imgs.length, bad: bad.filter(b => b),
                     zero: imgs.filter(i => !i.naturalWidth).map(i => i.getAttribute('src')),
                     noalt: imgs.filter(i => !i.alt.trim()).map(i => i.getAttribute('src'))}));
"""

_OVERFLOW = """
const w = window.innerWidth, out = [];
for (const el of document.querySelectorAll('p,h1,h2,h3,li,figcaption,caption,nav')) {
  if (el.closest('.scroll')) continue;  // tables scroll inside their own box
  const r = el.getBoundingClientRect();
  if (r.width && (r.right > w + 0.5 || r.left < -0.5))
    out.push(el.tagName + ': ' + el.textContent.slice(0, 60));
}
return {scroll: document.documentElement.scrollWidth, inner: w, wide: out};
"""


def _check_page(driver, path: Path) -> None:
    """No console errors, every image decoded and described, every link resolving."""
    _open(driver, path)
    driver.set_script_timeout(20)
    imgs = driver.execute_async_script(_IMAGES)
    assert imgs["n"] > 0
    assert imgs["bad"] == [] and imgs["zero"] == [], imgs
    assert imgs["noalt"] == [], imgs
    assert _errors(driver) == []
    hrefs = driver.execute_script(
        "return Array.from(document.links).map(a => a.href)")
    assert hrefs
    for href in hrefs:
        u = urlparse(href)
        assert u.scheme == "file", href  # nothing from the network
        target = Path(unquote(u.path))
        assert target.is_file(), href
        if u.fragment:
            ids = set(re.findall(r'\bid="?([^" >]+)', target.read_text(encoding="utf-8")))
            assert u.fragment in ids, href


def test_index_and_model_pages_load_cleanly(browser, report):
    _check_page(browser, report / "index.html")
    pages = sorted((report / "web" / "models").glob("*.html"))
    assert [p.name for p in pages] == ["mcc-k3.html", "scal-k2.html", "scal-k3.html"]
    for p in pages:
        _check_page(browser, p)


def test_model_page_shows_members_classes_and_neighbours(browser, report):
    from selenium.webdriver.common.by import By

    _open(browser, report / "web" / "models" / "scal-k3.html")
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "Nearest other cluster" in text and "silhouette" in text
    sprites = browser.find_elements(By.CSS_SELECTOR, 'img[src$="-c0.png"]')
    assert len(sprites) == 1
    # readable: each 28 px member drawn 84 px wide, ten to a row
    assert browser.execute_script("return arguments[0].getBoundingClientRect().width",
                                  sprites[0]) >= 10 * 84
    rows = browser.find_elements(By.CSS_SELECTOR, "table.classes tr")
    assert len(rows) == 1 + 3  # header, then a row per cluster
    assert browser.find_elements(By.CSS_SELECTOR, 'a[href$="K3.png"]')  # its figure


def test_k_selector_switches_the_figure(browser, report):
    from selenium.webdriver.common.by import By

    page = (report / "index.html").read_text(encoding="utf-8")
    assert "<figure data-off" not in page  # without script every K is shown
    _open(browser, report / "index.html")
    pick = browser.find_element(By.CSS_SELECTOR, "#web-K ~ .pick")
    buttons = pick.find_elements(By.CSS_SELECTOR, ".picker button")
    assert [b.text for b in buttons] == ["K = 2", "K = 3"]

    def shown():
        return [f.find_element(By.TAG_NAME, "a").get_attribute("href").rsplit("/", 1)[1]
                for f in pick.find_elements(By.TAG_NAME, "figure") if f.is_displayed()]

    assert shown() == ["K2.png"]
    buttons[1].click()
    assert shown() == ["K3.png"]
    assert buttons[1].get_attribute("aria-pressed") == "true"
    buttons[0].click()
    assert shown() == ["K2.png"]


def test_fits_table_sorts_and_shows_criteria(browser, report):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    _open(browser, report / "index.html")
    table = browser.find_element(By.CSS_SELECTOR, "table.sortable")
    heads = [h.text for h in table.find_elements(By.CSS_SELECTOR, "thead th")]
    assert "silhouette" in heads and "DB" in heads  # davies_bouldin, shortened
    col = heads.index("WCSS")

    def column():
        return [float(r.find_elements(By.TAG_NAME, "td")[col].get_attribute("data-v"))
                for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

    button = table.find_elements(By.CSS_SELECTOR, "thead th button")[col]
    button.click()
    assert column() == sorted(column()) and len(column()) == 3
    # keyboard: the header is a real button, Enter sorts again (descending)
    browser.execute_script("arguments[0].focus()", button)
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    assert column() == sorted(column(), reverse=True)
    sil = heads.index("silhouette")
    cells = [r.find_elements(By.TAG_NAME, "td")[sil].text
             for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
    assert sorted(cells) == ["", "0.17", "0.21"]  # mcc has none: an empty cell


@pytest.mark.parametrize("width", [400, 1400])
def test_nothing_overflows_the_window(browser, report, tmp_path, width):
    for page in (report / "index.html", report / "web" / "models" / "scal-k3.html"):
        _open(browser, page, width)
        got = browser.execute_script(_OVERFLOW)
        assert got["scroll"] <= got["inner"], (page.name, got)
        assert got["wide"] == [], (page.name, got)
        shot = tmp_path / f"{page.stem}-{width}.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
