"""The Dagster UI in a real browser: after a run, the asset page shows the asset, its latest
materialization and the lag metadata.

`dagster dev` runs on a test pipeline against the session nats-server; its sensor ingests the
published orders; headless Chromium (Debian's `chromium`, driven by Playwright) opens the asset
page. The screenshot is kept under test-artifacts/ (gitignored) to look at.
"""

import contextlib
import os
import shutil
import urllib.request
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.instance.ref import InstanceRef
from dagster_dev import dagster_dev, wait_for, write_dagster_home

from nilus_dagster.jetstream.local_server import free_port

pytestmark = pytest.mark.slow
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed: pip install -e '.[dev]'"
)

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
SCREENSHOT = ARTIFACTS / "ui-asset-page.png"
DEADLINE_SECONDS = 90
# Playwright's expect() waits 5 s by default, whatever the page's default timeout: too short for
# a page whose code location is still loading while other tests hold both cores.
EXPECT_MS = 60_000
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def find_chromium() -> str | None:
    """``NILUS_CHROMIUM``, Debian's ``/usr/bin/chromium``, or a ``chromium`` on PATH."""
    for candidate in (
        os.environ.get("NILUS_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip(
            "no Chromium found (/usr/bin/chromium, chromium on PATH or NILUS_CHROMIUM): "
            "install it with `apt-get install -y chromium`"
        )
    return path


def _serving(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def dismiss_newsletter_dialog(page) -> None:  # type: ignore[no-untyped-def]
    """A first visit is greeted by a newsletter dialog over the page, shortly after loading."""
    skip = page.get_by_role("button", name="Skip")
    with contextlib.suppress(sync_api.TimeoutError):
        skip.wait_for(state="visible", timeout=5_000)
        skip.click()
        skip.wait_for(state="detached", timeout=5_000)


def check_asset_page(page, run_id: str, partition: str, last_seq: int) -> None:  # type: ignore[no-untyped-def]
    expect = sync_api.expect
    lag_row = page.locator("tr", has_text="nats/sequence_lag").first
    expect(lag_row).to_be_visible(timeout=EXPECT_MS)
    dismiss_newsletter_dialog(page)
    expect(page.get_by_text("ui-orders", exact=True).first).to_be_visible(timeout=EXPECT_MS)
    # The latest materialization: its partition, and a link to the run that made it.
    expect(page.get_by_text("Latest materialization")).to_be_visible(timeout=EXPECT_MS)
    expect(page.get_by_text(partition, exact=True).first).to_be_visible(timeout=EXPECT_MS)
    expect(page.locator(f'a[href*="{run_id}"]').first).to_be_visible(timeout=EXPECT_MS)
    assert lag_row.inner_text().split()[-1] == "0"
    last_seq_row = page.locator("tr", has_text="nats/last_seq").first
    assert last_seq_row.inner_text().split()[-1] == str(last_seq)


def test_asset_page_shows_the_latest_materialization_and_the_lag(
    tmp_path, chromium, nats_server, publisher, stream_name, write_manifest
):
    subject = f"{stream_name}.created"
    publisher.create_stream(stream_name, [subject])
    published = publisher.publish_orders(subject, 300)
    manifest = write_manifest(
        name="ui-orders",
        # timeout=1: the sensor looks every second
        address=f"nats+jetstream://{nats_server.hostport}?subject={subject}&timeout=1",
        stream=stream_name,
        run_in_loop=True,
    )
    home = write_dagster_home(tmp_path / "dagster_home")
    env = {**os.environ, "NILUS_PIPELINES": str(manifest)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    key = dg.AssetKey("ui-orders")

    with (
        dagster_dev(home, env, tmp_path, port) as log,
        dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home))) as instance,
    ):
        wait_for(lambda: _serving(url), "the Dagster UI", log, DEADLINE_SECONDS)
        # The sensor (run_in_loop: true) requests the run that ingests the 300 orders.
        event = wait_for(
            lambda: instance.get_latest_materialization_event(key),
            "a materialization",
            log,
            DEADLINE_SECONDS,
        )
        metadata = event.asset_materialization.metadata
        assert metadata["nats/last_seq"].value == published[-1]
        assert metadata["nats/sequence_lag"].value == 0
        run_id = event.run_id
        partition = event.dagster_event.partition
        assert partition  # daily windows: the sensor's run recorded today's

        ARTIFACTS.mkdir(exist_ok=True)
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # a fresh profile
                executable_path=chromium,
                headless=True,
                args=CHROMIUM_ARGS,
                # Tall enough for the status, the description and the metadata table at once.
                viewport={"width": 1400, "height": 2000},
            )
            try:
                page = browser.new_page()
                page.set_default_timeout(60_000)
                page.goto(f"{url}/assets/ui-orders")
                try:
                    check_asset_page(page, run_id, partition, published[-1])
                finally:
                    # Kept on failure too: it shows what the page looked like.
                    page.screenshot(path=str(SCREENSHOT))
            finally:
                browser.close()
    assert SCREENSHOT.stat().st_size > 20_000
