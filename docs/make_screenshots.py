"""Screenshots of the demo's report and its MLflow runs for the docs, in headless Chromium.

    make demo
    .venv/bin/python docs/make_screenshots.py          # -> docs/figures/report_*.png,
                                                       #    docs/figures/mlflow_*.png

Needs Debian's chromium and chromium-driver, and selenium (the test extra). Starts
``mlflow ui`` on a free 127.0.0.1 port over ``results/mlflow.db`` and stops it after.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in (*FLAGS, f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def _wait(driver, script: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out: {script}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default=str(ROOT / "results"))
    parser.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    args = parser.parse_args()
    results, out = Path(args.results).resolve(), Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    port = _port()
    report_dir = results / "docs-report"
    subprocess.run([sys.executable, "-m", "hypersweep", "report", str(results / "demo"),
                    str(results / "demo-hpo"), str(results / "demo-blackbox"), "--out",
                    str(report_dir), "--no-mlflow", "--mlflow-ui",
                    f"http://127.0.0.1:{port}"], check=True)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver = _browser(1400, 1500)
    try:
        driver.get((report_dir / "report.html").as_uri())
        _wait(driver, "return document.body.dataset.drawn === '1'")
        driver.save_screenshot(str(out / "report_error_vs_t.png"))
        Select(driver.find_element(By.ID, "xaxis")).select_by_value("calls")
        _wait(driver, "return document.body.dataset.drawn === '2'")
        driver.execute_script("document.getElementById('best-0').scrollIntoView()")
        time.sleep(0.5)
        driver.save_screenshot(str(out / "report_methods_vs_calls.png"))
    finally:
        driver.quit()

    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
         f"sqlite:///{results / 'mlflow.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
        start_new_session=True, cwd=results.parent)
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.3)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=f"sqlite:///{results / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("demo-hpo")
        driver = _browser(1600, 900)
        try:
            driver.get(f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
                       "/runs?workflowType=machine_learning")
            expander = _wait(driver, "return [...document.querySelectorAll('button')].find("
                                     "b => (b.dataset.componentId || '').includes("
                                     "'runnamecellrenderer'))")
            expander.click()
            _wait(driver, "return document.querySelectorAll(\"a[href*='/runs/']\").length"
                          " > 2")
            from selenium.webdriver.common.action_chains import ActionChains

            handle = driver.find_element(  # the Run Name column, dragged wider
                By.CSS_SELECTOR, ".ag-header-cell[col-id*='Run Name'] .ag-header-cell-resize")
            ActionChains(driver).click_and_hold(handle).move_by_offset(120, 0).release(
                ).perform()
            time.sleep(1)
            driver.save_screenshot(str(out / "mlflow_runs.png"))
            child = client.search_runs([experiment.experiment_id],
                                       "tags.`hypersweep.role` = 'group'", max_results=1)[0]
            driver.get(f"http://127.0.0.1:{port}/#/experiments/{experiment.experiment_id}"
                       f"/runs/{child.info.run_id}/model-metrics"
                       "?workflowType=machine_learning")
            time.sleep(6)
            driver.save_screenshot(str(out / "mlflow_child_metrics.png"))
        finally:
            driver.quit()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    print("\n".join(str(p) for p in sorted(out.glob("report_*.png")) + sorted(
        out.glob("mlflow_*.png"))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
