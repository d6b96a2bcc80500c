"""What a reviewer sees: the MLflow UI in a real headless Chromium (Debian's), driven by Playwright."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Playwright adds --headless; a fresh profile comes from launch_persistent_context's user_data_dir
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_ui(trained):
    """`mlflow server` (what `make ui` runs) over the trained project's embedded store, on loopback."""
    port = _free_port()
    root = Path(trained["root"])
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen(
        [
            str(mlflow),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--default-artifact-root",
            str(root / "mlartifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_the_registered_model_page_shows_its_aliases_and_the_whole_model_card(mlflow_ui, trained, tmp_path):
    if CHROMIUM is None:  # CI installs it (.ci/run); a developer machine may not have it
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium for this test")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    version = trained["summary"]["registered"]["version"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_FLAGS,
            headless=True,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = browser.new_page()
            page.goto(f"{mlflow_ui}/#/models/distilflow-digits?workflowType=machine_learning")
            expect(page.get_by_text("@ challenger").first).to_be_visible(timeout=60_000)
            expect(page.get_by_text(f"Version {version}", exact=True).first).to_be_visible()
            page.screenshot(path=str(tmp_path / "model.png"))

            page.goto(f"{mlflow_ui}/#/models/distilflow-digits/versions/{version}?workflowType=machine_learning")
            # the version's description is the whole card, first heading to last, not its first paragraph
            for heading in (
                "Data",
                "Cleaning",
                "Metrics of every variant (frozen test split)",
                "Compression steps",
                "Intended use and limits",
            ):
                expect(page.get_by_role("heading", name=heading)).to_be_visible(timeout=60_000)
            expect(page.get_by_text("challenger").first).to_be_visible()
            page.screenshot(path=str(tmp_path / "version.png"), full_page=True)

            experiment = trained["summary"]["experiment_id"]
            page.goto(f"{mlflow_ui}/#/experiments/{experiment}/runs?workflowType=machine_learning")
            # the model-training view: runs by name, the parent's name saying the dataset
            expect(page.get_by_text("Model training").first).to_be_visible(timeout=60_000)
            expect(page.get_by_text("digits-").first).to_be_visible(timeout=60_000)
        finally:
            browser.close()
