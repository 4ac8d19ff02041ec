"""The operations console in a real browser: Debian's chromium driven headless by selenium against a running engine
(``traboule run``), an order sent over MLLP, found and opened, in English and French; an alert incident seen opening
and resolving. A screenshot of each page is saved under var/console-screenshots/ for a person to look at."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_flow import FIXTURES, free_port
from traboule.adapters.mllp import MLLPClient

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "var" / "console-screenshots"
ADMIN = "console-admin-token-0123456789abcdef"
READER = "console-reader-token-0123456789abcdef"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="chromium and chromedriver are not installed (Debian packages chromium chromium-driver: `make peers`)",
)


@contextlib.contextmanager
def running_engine(folder: Path, extra: str = "") -> Iterator[dict[str, Any]]:
    """A real engine, one process: the RIS orders channel, an admin token and a read-only one (``extra``: more
    configuration, appended)."""
    http, mllp = free_port(), free_port()
    config = folder / "traboule.toml"
    config.write_text(
        f'[engine]\ndefaults = false\ndata_dir = "{folder / "var"}"\n'
        f'[http]\nport = {http}\ntokens = ["{ADMIN}", {{ name = "ris-team", token = "{READER}", role = "read" }}]\n'
        f'[[channels]]\nname = "ris-orders"\nkind = "hl7-orders"\nsource = {{ adapter = "mllp-listener", '
        f'host = "127.0.0.1", port = {mllp} }}\n'
        '[[channels]]\nname = "fhir"\nkind = "fhir"\n' + extra  # a channel events can be reprocessed into
    )
    log = folder / "engine.log"
    env = dict(os.environ, TRABOULE_CONFIG=str(config), TRABOULE_LOG_FORMAT="json")
    for name in ("TRABOULE_API_TOKENS", "TRABOULE_DATA_DIR", "TRABOULE_HTTP_PORT", "TRABOULE_MLLP_PORT"):
        env.pop(name, None)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "traboule.app.cli", "run"], env=env, cwd=ROOT, stderr=out)
    try:
        deadline = time.monotonic() + 60
        while '"engine.ready"' not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.1)
        yield {"base": f"http://127.0.0.1:{http}", "mllp": mllp, "var": folder / "var"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    with running_engine(tmp_path_factory.mktemp("console")) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM or ""
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1366,900")  # a laptop
    options.add_argument("--lang=en-GB")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver: Any, name: str) -> None:
    """A full-height screenshot of the page under var/console-screenshots/."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1366, min(max(900, int(height)), 4000))
    driver.save_screenshot(str(SHOTS / f"{name}.png"))
    driver.set_window_size(1366, 900)


def follow(driver: Any, element: Any) -> None:
    """Click ``element`` (a link, a submit button) and wait for the next page to replace this one."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    page = driver.find_element(By.TAG_NAME, "html")
    element.click()

    def replaced(driver: Any) -> bool:
        try:
            page.is_enabled()  # raises once the page is gone (stale, or "does not belong to the document")
            return False
        except WebDriverException:
            return driver.execute_script("return document.readyState") == "complete"

    WebDriverWait(driver, 10, ignored_exceptions=(WebDriverException,)).until(replaced)


def log_in(driver: Any, base: str, token: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/console/")
    assert driver.current_url.endswith("/console/login")  # redirected to the form
    driver.find_element(By.ID, "token").send_keys(token)
    follow(driver, driver.find_element(By.ID, "login"))


def test_log_in_find_an_order_open_it_log_out(engine: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    base, driver = engine["base"], browser
    order = (FIXTURES / "orm_o01_nw_latin1.hl7").read_bytes()  # MSH-18 8859/1, accession ACC0001

    async def send() -> bytes:
        async with MLLPClient("127.0.0.1", engine["mllp"], timeout=10) as client:
            return await client.send(order)

    assert b"MSA|AA" in asyncio.run(send())

    driver.get(f"{base}/console/login")
    shot(driver, "01-login")
    log_in(driver, base, ADMIN)
    assert driver.current_url.endswith("/console/")
    assert driver.find_element(By.ID, "engine-status").text == "ok"
    assert "ris-orders" in driver.find_element(By.CSS_SELECTOR, "table.channels").text
    assert driver.find_elements(By.CSS_SELECTOR, "table.channels svg.chart")  # the inline SVG charts
    shot(driver, "02-dashboard")

    follow(driver, driver.find_element(By.LINK_TEXT, "Messages"))
    unlabelled = driver.find_elements(
        By.XPATH, "//form[@role='search']//input[not(ancestor::label) and not(@type='hidden')]"
    )
    assert unlabelled == []  # every field of the search form has its label
    links: list[Any] = []
    for _ in range(50):  # the search index follows the journal within a second or so
        field = driver.find_element(By.ID, "accession")
        field.clear()
        field.send_keys("ACC0001")
        follow(driver, driver.find_element(By.ID, "search"))
        links = driver.find_elements(By.CSS_SELECTOR, "a.message-link")
        if links:
            break
        time.sleep(0.2)
    assert len(links) == 1, driver.page_source[-1500:]
    assert "MSG0001" in driver.find_element(By.CSS_SELECTOR, "table.results").text
    shot(driver, "03-messages")

    follow(driver, driver.find_element(By.CSS_SELECTOR, "a.message-link"))
    page = driver.find_element(By.TAG_NAME, "main").text
    assert driver.find_element(By.ID, "entry-control-id").text == "MSG0001"
    assert "Patient Name" in page and "DUPONT^Hélène^Marie" in page  # named fields, decoded as 8859/1
    assert "Filler Order Number" in page and "ACC0001" in page
    assert "order.new" in page  # the canonical event it maps to today
    assert "8859/1" in page and "ACC0001" in driver.find_element(By.ID, "keys").text
    shot(driver, "04-message")

    follow(driver, driver.find_element(By.PARTIAL_LINK_TEXT, "Français"))
    assert "Segments et champs" in driver.find_element(By.TAG_NAME, "main").text
    shot(driver, "05-message-fr")
    follow(driver, driver.find_element(By.PARTIAL_LINK_TEXT, "English"))

    follow(driver, driver.find_element(By.ID, "logout"))
    assert driver.current_url.endswith("/console/login")
    driver.get(f"{base}/console/messages")
    assert driver.current_url.endswith("/console/login")  # the session is gone
    shot(driver, "06-logged-out")


def test_a_wrong_token_is_refused_and_a_post_needs_its_csrf_token(engine: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    base, driver = engine["base"], browser
    driver.delete_all_cookies()
    log_in(driver, base, "not-the-engine-token-0123456789")
    assert "not one of the engine" in driver.find_element(By.ID, "login-error").text
    assert driver.get_cookie("traboule_session") is None
    shot(driver, "07-login-refused")

    log_in(driver, base, READER)
    assert "ris-team" in driver.find_element(By.TAG_NAME, "header").text
    session = driver.get_cookie("traboule_session")
    assert session is not None and session["httpOnly"] and session["sameSite"] == "Strict"
    cookies = {c["name"]: c["value"] for c in driver.get_cookies()}
    with httpx.Client(base_url=base, cookies=cookies) as client:  # the same session, a forged form
        assert client.get("/console/").status_code == 200
        assert client.post("/console/logout", data={}).status_code == 403
        assert client.post("/console/logout", data={"csrf": "x" * 43}).status_code == 403
        assert client.get("/health").status_code == 401  # a session is not a bearer token
    follow(driver, driver.find_element(By.ID, "logout"))


def test_reprocess_with_a_dry_run_and_replay_a_dead_letter(engine: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    from traboule.bus.embedded import EmbeddedBus
    from traboule.stores import journal

    base, driver, var = engine["base"], browser, engine["var"]

    async def dead_letter() -> None:  # an event the FHIR channel cannot read: dead-lettered after its attempts
        bus = EmbeddedBus(str(var / "bus.sqlite"))
        try:
            await bus.send("fhir", [("order.new", b'{"broken": "event"}', "broken-1", {})])
        finally:
            await bus.close()

    asyncio.run(dead_letter())
    # An order journaled before the FHIR channel existed (its events never reached it): a backfill to do.
    order = (FIXTURES / "orm_o01_nw_latin1.hl7").read_bytes().replace(b"ACC0001", b"ACC0099")
    entry = journal.record(
        var / "journal.sqlite",
        journal.JournalEntry(
            "ris-orders",
            order.replace(b"MSG0001", b"MSG0099"),
            "accepted",
            control_id="MSG0099",
            message_type="ORM^O01",
            idempotency_key="browser-backfill-1",
        ),
    )
    driver.delete_all_cookies()
    log_in(driver, base, ADMIN)
    driver.get(f"{base}/console/messages/{entry.id}")
    follow(driver, driver.find_element(By.ID, "reprocess-link"))
    driver.find_element(By.ID, "to-fhir").click()
    driver.find_element(By.ID, "reason").send_keys("FHIR channel added after the order")
    shot(driver, "08-reprocess-form")
    follow(driver, driver.find_element(By.ID, "dry-run"))
    report = driver.find_element(By.ID, "report").text
    assert "fhir: ServiceRequest/" in report and "nothing was sent" in report
    assert driver.find_elements(By.CSS_SELECTOR, "#report span.add")  # the diff's added lines, marked
    shot(driver, "09-reprocess-dry-run")
    follow(driver, driver.find_element(By.ID, "confirm"))
    assert driver.find_element(By.ID, "count-messages").text == "1"
    assert driver.find_element(By.ID, "count-failed").text == "0"
    shot(driver, "10-reprocess-done")

    deadline = time.monotonic() + 15
    while True:
        driver.get(f"{base}/console/dead-letters/fhir")
        if driver.find_elements(By.CSS_SELECTOR, "article.letter"):
            break
        assert time.monotonic() < deadline, "no dead letter"
        time.sleep(0.3)
    assert "broken-1" in driver.find_element(By.TAG_NAME, "main").text
    assert driver.find_element(By.CSS_SELECTOR, ".letter-error").text  # why it was dead-lettered
    shot(driver, "11-dead-letters")
    follow(driver, driver.find_element(By.CSS_SELECTOR, "button.replay"))
    assert "Replayed" in driver.find_element(By.ID, "done").text
    shot(driver, "12-dead-letter-replayed")


def test_an_alert_incident_opens_and_resolves(tmp_path: Path, browser: Any) -> None:
    """A ``dead_letters`` rule evaluated every second: an event the FHIR channel cannot read is dead-lettered, the
    incident opens (dashboard banner, alerts page: rule and channel); the operator discards the letter from the
    console and the incident resolves. An engine of its own: the other tests leave dead letters on its FHIR queue."""
    from selenium.webdriver.common.by import By

    from traboule.bus.embedded import EmbeddedBus

    alerting = (
        '[alerts]\ninterval = "1s"\n'
        f'[alerts.notify.ops]\nkind = "webhook"\nurl = "http://127.0.0.1:{free_port()}/hook"\ntimeout = "1s"\n'
        '[[alerts.rule]]\nname = "fhir-dead-letters"\nkind = "dead_letters"\nchannel = "fhir"\n'
        'for = "1s"\nclear = "1s"\nnotify = ["ops"]\n'
    )
    with running_engine(tmp_path, alerting) as engine:
        base, driver, var = engine["base"], browser, engine["var"]

        async def dead_letter() -> None:  # dead-lettered after its attempts (about 2 s on the embedded bus)
            bus = EmbeddedBus(str(var / "bus.sqlite"))
            try:
                await bus.send("fhir", [("order.new", b'{"broken": "event"}', "broken-alert-1", {})])
            finally:
                await bus.close()

        driver.delete_all_cookies()
        log_in(driver, base, ADMIN)
        driver.get(f"{base}/console/alerts")
        assert driver.find_elements(By.ID, "none-open")  # nothing open before the cause
        asyncio.run(dead_letter())

        def reload_until(path: str, selector: str, timeout: float = 15.0) -> list[Any]:
            """Load ``path`` again until ``selector`` finds something (the engine evaluates every second)."""
            deadline = time.monotonic() + timeout
            while True:
                driver.get(f"{base}{path}")
                found = driver.find_elements(By.CSS_SELECTOR, selector)
                if found:
                    return found
                assert time.monotonic() < deadline, f"{selector} not on {path}: {driver.page_source[-1500:]}"
                time.sleep(0.2)

        banner = reload_until("/console/", "#alerts-banner")[0]
        assert banner.text.endswith(": 1")
        row = next(r for r in driver.find_elements(By.CSS_SELECTOR, "table.channels tr") if "fhir" in r.text)
        assert row.find_element(By.CSS_SELECTOR, "td.open-alerts").text == "1"
        shot(driver, "13-alert-banner")
        follow(driver, banner.find_element(By.TAG_NAME, "a"))
        assert driver.current_url.endswith("/console/alerts")
        cells = [c.text for c in driver.find_elements(By.CSS_SELECTOR, "#open-incidents tr.incident td")]
        assert cells[:3] == ["fhir-dead-letters", "fhir", "dead_letters"], cells
        assert cells[4] == ""  # not resolved
        shot(driver, "14-alert-open")

        # The fix: the operator discards the letter (with a reason) from the console.
        letter = reload_until("/console/dead-letters/fhir", "article.letter")[0]
        assert "broken-alert-1" in letter.text
        letter.find_element(By.NAME, "reason").send_keys("a test event, nothing to deliver")
        follow(driver, letter.find_element(By.CSS_SELECTOR, "button.discard"))

        resolved = reload_until("/console/alerts", "#resolved-incidents tr.incident.state-resolved")
        cells = [c.text for c in resolved[0].find_elements(By.TAG_NAME, "td")]
        assert cells[:3] == ["fhir-dead-letters", "fhir", "dead_letters"], cells
        assert cells[4]  # resolved at
        assert driver.find_elements(By.ID, "none-open")
        shot(driver, "15-alert-resolved")
