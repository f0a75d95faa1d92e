"""The demo's report and its MLflow runs, looked at in a real headless Chromium.

``make demo``'s two commands run as they are (the three shipped demo studies in one Ray,
then ``hypersweep report``), in a temporary folder; Chromium (Debian's ``chromium`` and
``chromium-driver``, which ``.ci/run`` installs) opens the report from disk, finds one plot
per panel, switches the x axis, the log scales and the problem, checks the drawn data
against the Parquet rows, takes a screenshot and reads Chromium's network log: no request
leaves the machine. Then a real ``mlflow ui`` on 127.0.0.1 serves the demo's store; the
report's own link opens the model-training view and the nested runs show their full names.

Without Chromium the tests skip, unless ``HYPERSWEEP_BROWSER_TESTS=required`` (CI) makes
that a failure.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import REPO_ROOT, free_port

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DEMO_CONFIGS = [REPO_ROOT / "configs" / name
                for name in ("demo.yaml", "demo_hpo.yaml", "demo_blackbox.yaml")]
DEMO_OUTPUTS = ["results/demo", "results/demo-hpo", "results/demo-blackbox"]
LOCAL_PREFIXES = ("file:", "data:", "blob:", "about:", "chrome:", "devtools:",
                  "http://127.0.0.1", "ws://127.0.0.1")


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    message = "headless Chromium tests need Debian's chromium and chromium-driver"
    if os.environ.get("HYPERSWEEP_BROWSER_TESTS") == "required":
        pytest.fail(message + " (HYPERSWEEP_BROWSER_TESTS=required)")
    pytest.skip(message)


@pytest.fixture(scope="module")
def ui_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, ui_port) -> Path:
    """``make demo`` in a fresh folder: the three studies in one run, then their report in
    the same process (``--report``, linked to the MLflow UI the module starts on
    ``ui_port``)."""
    _browser_binaries()
    root = tmp_path_factory.mktemp("demo")
    cli = [sys.executable, "-m", "hypersweep"]
    run = subprocess.run([*cli, "run", *map(str, DEMO_CONFIGS), "--report",
                          "results/demo-report", "--mlflow-ui", f"http://127.0.0.1:{ui_port}"],
                         cwd=root, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "report written to results/demo-report/report.html" in run.stdout
    return root


@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = _browser_binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 "--window-size=1400,1800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager: never download
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(120)
    yield driver
    driver.quit()


def _requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _wait(driver, script: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {script}")


def _choose(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    before = int(driver.execute_script("return Number(document.body.dataset.drawn)"))
    Select(driver.find_element(By.ID, select_id)).select_by_value(value)
    _wait(driver, f"return Number(document.body.dataset.drawn) > {before}")


def _panel(driver, panel_id: str) -> dict:
    return driver.execute_script(
        "const d = document.getElementById(arguments[0]);"
        "return {xtype: d.layout.xaxis.type, ytype: d.layout.yaxis.type,"
        " xtitle: d.layout.xaxis.title.text, shown: d.offsetParent !== null,"
        " traces: d.data.map(t => ({name: t.name || null, x: Array.from(t.x),"
        "   role: t.meta ? t.meta.role : null}))};", panel_id)


def test_the_report_in_headless_chromium(demo, browser):
    from hypersweep.tools.report import interactive
    from hypersweep.tools.report.reading import read_outputs

    page = demo / "results" / "demo-report" / "report.html"
    browser.get(page.as_uri())
    _wait(browser, "return document.body.dataset.drawn === '1'")

    # one plot per panel of the spec, the spec rebuilt here from the Parquet outputs
    results, traces = read_outputs([demo / d for d in DEMO_OUTPUTS])
    spec = interactive.figure_spec(results, traces)
    ids = [p["id"] for p in spec["panels"]]
    assert browser.execute_script("return JSON.parse(document.getElementById('spec')"
                                  ".textContent).panels.map(p => p.id)") == ids
    assert browser.execute_script(
        "return document.querySelectorAll('.panel.js-plotly-plot').length") == len(ids)
    for pid in ids:
        assert browser.execute_script(
            "return document.getElementById(arguments[0]).querySelectorAll("
            "'.main-svg').length > 0", pid), pid
    assert {p["section"] for p in spec["panels"]} >= {"error", "best", "test_loss"}
    assert {p["problem"] for p in spec["panels"] if p["section"] == "error"} == {
        "ridge", "logreg"}

    # x axis: t, then wall time; the drawn x of a line = the median wall time over seeds
    error_id = next(p["id"] for p in spec["panels"] if p["section"] == "error"
                    and p["problem"] == "ridge")
    drawn = _panel(browser, error_id)
    assert drawn["xtitle"] == "t (inner steps)" and drawn["ytype"] == "log"
    line = next(t for t in drawn["traces"] if t["role"] == "median")
    assert line["x"] == [5, 10, 20, 50, 100, 200]
    assert any(t["role"] == "reference" for t in drawn["traces"])  # the q^t slope
    _choose(browser, "xaxis", "wall")
    drawn = _panel(browser, error_id)
    assert drawn["xtitle"].startswith("wall time") and drawn["xtype"] == "log"
    line = next(t for t in drawn["traces"] if t["role"] == "median")
    assert not any(t["role"] == "reference" for t in drawn["traces"])
    algorithm, rest = line["name"].split(" ", 1)
    k_setting = rest.split(" ")[0]  # "K=10" or "K=t"; itd has none
    rows = results[(results["pipeline"] == "hypergradient_error")
                   & (results["problem"] == "ridge") & (results["algorithm"] == algorithm)
                   & (results["backend"] == ("torch" if "[torch]" in line["name"] else "jax"))
                   & (results["status"] == "ok")]
    if k_setting.startswith("K="):
        rows = rows[rows["K_setting"] == k_setting[2:]]
    expected = rows.groupby("t")["wall_time_s"].median().sort_index().to_numpy()
    np.testing.assert_allclose(line["x"], expected, rtol=1e-9)

    # log toggles override the panel defaults
    _choose(browser, "logy", "linear")
    _choose(browser, "logx", "linear")
    drawn = _panel(browser, error_id)
    assert (drawn["xtype"], drawn["ytype"]) == ("linear", "linear")
    _choose(browser, "logy", "auto")
    _choose(browser, "logx", "auto")

    # the problem selector hides the other problem's panels
    _choose(browser, "problem", "ridge")
    shown = {p["id"]: _panel(browser, p["id"])["shown"] for p in spec["panels"]}
    assert all(shown[p["id"]] == (p["problem"] == "ridge") for p in spec["panels"])
    _choose(browser, "problem", "")
    _choose(browser, "xaxis", "calls")

    # the screenshot is a drawn page, not a blank one
    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"))
    assert shot.shape[0] > 500 and shot.shape[1] > 500
    not_white = (shot < 245).any(axis=2).mean()
    colours = len(np.unique(shot.reshape(-1, 3)[::7], axis=0))
    assert not_white > 0.03 and colours > 50, (not_white, colours)
    (demo / "report-screenshot.png").write_bytes(browser.get_screenshot_as_png())

    # nothing left the machine: every request was to the file, data: or loopback
    urls = _requested_urls(browser)
    assert urls and all(u.startswith(LOCAL_PREFIXES) for u in urls), [
        u for u in urls if not u.startswith(LOCAL_PREFIXES)]


@pytest.fixture(scope="module")
def mlflow_ui(demo, ui_port):
    """``mlflow ui`` on 127.0.0.1 serving the demo's store, started as a user would."""
    store = demo / "results" / "mlflow.db"
    log_file = open(demo / "mlflow-ui.log", "ab")
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{store}",
         "--host", "127.0.0.1", "--port", str(ui_port), "--workers", "1"],
        cwd=demo, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{ui_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (demo / "mlflow-ui.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert time.monotonic() < deadline, "mlflow ui did not start"
                time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_mlflow_ui_shows_the_nested_runs_in_the_model_training_view(demo, mlflow_ui,
                                                                     browser):
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By

    client = MlflowClient(tracking_uri=f"sqlite:///{demo / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("demo")
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("hypersweep.role") == "parent")
    children = {r.info.run_name for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(children) >= 20
    # `run --report` logged the report beside each study's runs (in the run's process)
    for study in ("demo", "demo-hpo", "demo-blackbox"):
        found = client.search_runs(
            [client.get_experiment_by_name(study).experiment_id],
            filter_string="tags.`hypersweep.role` = 'parent'")
        assert len(found) == 1, study
        logged = {a.path for a in client.list_artifacts(found[0].info.run_id, "report")}
        assert {"report/report.html", "report/error_vs_t.png"} <= logged, (study, logged)

    # the report's link to the demo's runs, clicked in the page
    browser.get((demo / "results" / "demo-report" / "report.html").as_uri())
    _wait(browser, "return document.body.dataset.drawn === '1'")
    link = browser.find_element(By.LINK_TEXT, "demo (runs)")
    assert link.get_attribute("href").startswith(mlflow_ui)
    link.click()
    _wait(browser, "return location.href.includes('workflowType=machine_learning')", 60)
    _wait(browser, "return document.querySelectorAll(\"a[href*='/runs/']\").length > 0", 90)
    text = browser.execute_script("return document.body.innerText")
    assert "Model training" in text and "Token Usage" not in text

    # expand the parent run: its children show, each under its full name
    expander = _wait(browser, "return [...document.querySelectorAll('button')].find("
                              "b => (b.dataset.componentId || '').includes("
                              "'runnamecellrenderer'))", 60)
    expander.click()
    names = _wait(browser, "const n = [...document.querySelectorAll(\"a[href*='/runs/']\")]"
                           ".map(a => a.textContent.trim()); return n.length > 5 ? n : null",
                  60)
    shown_children = [n for n in names if n != parent.info.run_name]
    assert len(shown_children) >= 5, names
    assert set(shown_children) <= children, set(shown_children) - children
    # full names in the DOM (the table's title attribute and text), readable once the
    # Run Name column (190 px in MLflow 3.17, ~100 px of it for a nested name) is dragged
    # wider, as a user does: every name then fits
    from selenium.webdriver.common.action_chains import ActionChains

    handle = browser.find_element(
        By.CSS_SELECTOR, ".ag-header-cell[col-id*='Run Name'] .ag-header-cell-resize")
    ActionChains(browser).click_and_hold(handle).move_by_offset(220, 0).release().perform()
    time.sleep(0.5)
    clipped = browser.execute_script(
        "return [...document.querySelectorAll(\"a[href*='/runs/'] span\")]"
        ".filter(s => s.scrollWidth > s.clientWidth + 1)"
        ".map(s => [s.textContent, s.scrollWidth, s.clientWidth])")
    assert clipped == [], clipped
    (demo / "mlflow-screenshot.png").write_bytes(browser.get_screenshot_as_png())
