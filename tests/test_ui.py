"""The dashboard at /ui/, end to end in a real headless Chromium (Debian's `chromium` and
`chromium-driver`) against a real sidecar watching a ConfigMap-style directory: in a
thread of the test, or a real `rule-sidecar serve` process where it is stopped (SIGTERM)
or frozen (SIGSTOP). What the page asked for is read from the browser's Resource Timing.

Each test saves a screenshot of every state it reaches under its own output folder
(pytest's `tmp_path`, kept for the last three runs: /tmp/pytest-of-<user>/). Without
Chromium the browser tests skip, unless RULE_SIDECAR_REQUIRE_BROWSER is set (CI sets
it), in which case they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from conftest import dump_yaml, fraud_doc, make_ruleset_doc
from db_support import Database
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait
from server_support import ConfigMapDir, ThreadedSidecar, serving, threaded_sidecar

from sidecar.config import Settings

# Starts processes, browsers or databases: left out of the quick loop (-m 'not slow').
pytestmark = pytest.mark.slow

WAIT_SECONDS = 10.0
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
# axe-core, Deque's accessibility rules engine (npm; .ci/run installs it here).
AXE = Path(
    os.environ.get(
        "AXE_CORE_JS",
        Path(__file__).parents[1] / ".ci/node/node_modules/axe-core/axe.min.js",
    )
)


def missing(reason: str) -> None:
    """Skip for a developer without the tool; fail in CI, which installs it."""
    if os.environ.get("RULE_SIDECAR_REQUIRE_BROWSER"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    """One headless Chromium for the module; each test opens its own page."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing("needs Debian's chromium and chromium-driver (apt-get install ...)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1800")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


Shoot = Callable[[str], Path]


@pytest.fixture
def shoot(browser: WebDriver, tmp_path: Path) -> Shoot:
    """`shoot("name")` saves the page as tmp_path/screenshots/NN-name.png."""
    folder = tmp_path / "screenshots"
    folder.mkdir()
    taken: list[Path] = []

    def take(name: str) -> Path:
        path = folder / f"{len(taken) + 1:02d}-{name}.png"
        assert browser.save_screenshot(str(path)), f"no screenshot at {path}"
        taken.append(path)
        return path

    return take


@pytest.fixture(autouse=True)
def blank_page(browser: WebDriver) -> None:
    """Each test starts on a blank page with the browser's log read: the page of the test
    before keeps asking its stopped sidecar for health until it is left."""
    browser.get("about:blank")
    browser.get_log("browser")


@pytest.fixture
def mount(configmap_dir: ConfigMapDir) -> ConfigMapDir:
    """The ConfigMap volume: `rules.yaml` holds the `fraud` ruleset."""
    return configmap_dir


@pytest.fixture
def sidecar(mount: ConfigMapDir) -> Iterator[ThreadedSidecar]:
    with threaded_sidecar(Settings(rules_dirs=(mount.root,), debounce_ms=20)) as server:
        yield server


def wait(
    browser: WebDriver,
    condition: Callable[[WebDriver], Any],
    what: str,
    seconds: float = WAIT_SECONDS,
) -> Any:
    """Poll `condition` until it is truthy. An element it found may be replaced by the
    page before it reads it (the dashboard re-renders a table when a read arrives: a
    find and a read are two WebDriver commands, with page scripts running between
    them): that is polled again, not an error."""
    try:
        return WebDriverWait(
            browser,
            seconds,
            poll_frequency=0.05,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
        ).until(condition)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what}") from None


def shown(browser: WebDriver, element_id: str) -> WebElement | None:
    """The element while it is displayed, else None (a `wait` condition)."""
    element = browser.find_element(By.ID, element_id)
    return element if element.is_displayed() else None


def text(browser: WebDriver, element_id: str) -> str:
    return str(browser.find_element(By.ID, element_id).text)


def open_dashboard(browser: WebDriver, server: ThreadedSidecar) -> None:
    """Load /ui/ and wait for the first read and the live feed."""
    browser.get(f"{server.url}/ui/")
    wait(browser, lambda b: text(b, "version") == "1", "version 1")
    wait(browser, lambda b: text(b, "feed-state") == "connected", "the live feed connected")
    browser.execute_script("window.notReloaded = true")


def expand(browser: WebDriver, ruleset_id: str) -> list[WebElement]:
    """Open a ruleset (collapsed by default) and wait for its rules' rows."""
    block = f'#rulesets details[data-ruleset="{ruleset_id}"]'
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, block), f"ruleset {ruleset_id}")
    browser.find_element(By.CSS_SELECTOR, f"{block} > summary").click()
    rows: list[WebElement] = wait(
        browser,
        lambda b: b.find_elements(By.CSS_SELECTOR, f"{block} tr[data-rule]"),
        f"the rules of {ruleset_id}",
    )
    return rows


def filter_rules(browser: WebDriver, needle: str) -> list[str]:
    """Type `needle` into the filter; the ids of the rules shown once the answer is in."""
    field = browser.find_element(By.ID, "filter")
    field.clear()
    field.send_keys(needle)
    wait(
        browser,
        lambda b: b.find_element(By.ID, "rulesets").get_attribute("data-filter") == needle,
        f"the rules matching {needle}",
    )
    return [
        str(row.get_attribute("data-rule"))
        for row in browser.find_elements(By.CSS_SELECTOR, "#rulesets tr[data-rule]")
    ]


def still_same_page(browser: WebDriver) -> bool:
    return bool(browser.execute_script("return window.notReloaded === true"))


def events(browser: WebDriver, event_type: str) -> list[WebElement]:
    return list(browser.find_elements(By.CSS_SELECTOR, f'#events li[data-event="{event_type}"]'))


def console_errors(browser: WebDriver) -> list[str]:
    """Errors the page logged: a script error or a Content-Security-Policy refusal."""
    return [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def broken_fraud() -> str:
    """The fraud ruleset with a CEL syntax error in the second rule's condition."""
    document = fraud_doc()
    document["spec"]["rules"][1]["condition"] = "input.country !="
    return dump_yaml(document)


class TestLiveUpdates:
    """The page follows the sidecar without being reloaded."""

    def test_swap_shows_event_version_and_diff(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir, shoot: Shoot
    ) -> None:
        """A ..data swap: event, new version and the changed field appear in place."""
        open_dashboard(browser, sidecar)
        assert text(browser, "health") == "healthy"
        assert text(browser, "monitoring") == "on"
        assert "First load, version 1: 4 changes" in text(browser, "changes-summary")
        expand(browser, "fraud")
        rows = browser.find_elements(By.CSS_SELECTOR, '#rulesets tr[data-rule="large-amount"]')
        assert len(rows) == 1
        assert "input.amount > 1000" in rows[0].text
        assert "rules.yaml:" in rows[0].text  # the rule's source file:line
        shoot("loaded")

        mount.publish({"rules.yaml": dump_yaml(fraud_doc(60))})

        wait(browser, lambda b: text(b, "version") == "2", "version 2")
        reloaded = wait(browser, lambda b: events(b, "rules_reloaded"), "a rules_reloaded event")
        assert "version 1 → 2" in reloaded[0].text
        assert events(browser, "rule_updated")
        wait(
            browser,
            lambda b: "Version 1 → 2: 1 change." in text(b, "changes-summary"),
            "the diff of version 2",
        )
        change = browser.find_element(By.CSS_SELECTOR, '#changes li[data-change="rule_updated"]')
        assert "rule large-amount (fraud)" in change.text
        assert "points: 40 → 60" in change.text
        first_row = browser.find_element(By.CSS_SELECTOR, "#history tr")
        assert first_row.get_attribute("data-status") == "success"
        assert "1 → 2" in first_row.text
        assert still_same_page(browser)
        shoot("after-swap")
        assert console_errors(browser) == []

    def test_broken_rule_banner_until_fixed(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir, shoot: Shoot
    ) -> None:
        """A broken swap raises a banner with file:line; a good swap clears it."""
        open_dashboard(browser, sidecar)
        assert shown(browser, "banner") is None

        mount.publish({"rules.yaml": broken_fraud()})

        banner = wait(browser, lambda b: shown(b, "banner"), "the failed-reload banner")
        assert "Last reload failed: still serving version 1" in banner.text
        locations = [e.text for e in banner.find_elements(By.CSS_SELECTOR, ".location")]
        assert any(re.search(r"/rules\.yaml:\d+:\d+$", place) for place in locations), locations
        assert text(browser, "version") == "1"
        assert text(browser, "health") == "degraded"
        assert browser.title == "Reload failed · rule-sidecar"
        failed = browser.find_element(By.CSS_SELECTOR, '#history tr[data-status="failed"]')
        assert "rules.yaml:" in failed.find_element(By.CSS_SELECTOR, ".problems").text
        assert events(browser, "reload_failed")
        shoot("broken")

        mount.publish({"rules.yaml": dump_yaml(fraud_doc(55))})

        wait(browser, lambda b: text(b, "version") == "2", "version 2 after the fix")
        wait(browser, lambda b: shown(b, "banner") is None, "no banner")
        assert text(browser, "health") == "healthy"
        assert browser.title == "rule-sidecar"
        assert still_same_page(browser)
        shoot("fixed")
        assert console_errors(browser) == []

    def test_feed_reconnects_and_resumes(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir
    ) -> None:
        """Dropped by the server, the feed comes back and replays what it missed."""
        open_dashboard(browser, sidecar)
        assert sidecar.state is not None
        notifier = sidecar.state.notifier
        sidecar.run(notifier.close_all())
        wait(browser, lambda b: text(b, "feed-state") != "connected", "the feed dropped")
        mount.publish({"rules.yaml": dump_yaml(fraud_doc(70))})
        wait(browser, lambda b: text(b, "feed-state") == "connected", "the feed back")
        wait(browser, lambda b: text(b, "version") == "2", "version 2")
        assert len(events(browser, "rules_reloaded")) == 1
        assert still_same_page(browser)


class TestRestart:
    """The sidecar stopped and started again on the same port, the page left open."""

    def test_the_page_reads_everything_again_after_a_restart(
        self, browser: WebDriver, mount: ConfigMapDir, shoot: Shoot
    ) -> None:
        """Restarted with other rules (again at version 1): the feed says
        `resync_required`, and the rules shown are the new ones, not the old instance's
        answer revalidated by a tag that repeats."""
        settings = Settings(rules_dirs=(mount.root,), debounce_ms=20)
        with threaded_sidecar(settings) as first:
            open_dashboard(browser, first)
            port = first.port
            expand(browser, "fraud")
            assert browser.find_elements(By.CSS_SELECTOR, 'tr[data-rule="large-amount"]')
        mount.publish({"rules.yaml": dump_yaml(make_ruleset_doc("extra"))})
        with ThreadedSidecar(settings, port=port) as second:
            wait(browser, lambda b: events(b, "resync_required"), "a resync_required event")
            wait(
                browser,
                lambda b: b.find_elements(By.CSS_SELECTOR, '[data-ruleset="extra"]'),
                "the restarted sidecar's ruleset",
            )
            assert not browser.find_elements(By.CSS_SELECTOR, '[data-ruleset="fraud"]')
            assert not browser.find_elements(By.CSS_SELECTOR, 'tr[data-rule="large-amount"]')
            expand(browser, "extra")
            assert browser.find_elements(By.CSS_SELECTOR, 'tr[data-rule="extra-big"]')
            assert text(browser, "version") == "1"
            assert "restarted" in events(browser, "resync_required")[0].text
            assert second.port == port
            assert still_same_page(browser)
            shoot("after-restart")


UNREACHABLE = re.compile(r"unreachable since \d\d:\d\d:\d\d")


def busy(browser: WebDriver, element_id: str) -> bool:
    return browser.find_element(By.ID, element_id).get_attribute("aria-disabled") == "true"


class TestUnreachable:
    """A real `rule-sidecar serve` process stopped with SIGTERM and started again on the
    same port, the page left open: it says what it cannot know, then recovers whole."""

    def test_stopped_then_started_again(
        self, browser: WebDriver, mount: ConfigMapDir, tmp_path: Path, shoot: Shoot
    ) -> None:
        with serving(tmp_path, mount.root) as first:
            open_dashboard(browser, first)
            assert text(browser, "health") == "healthy"
            assert re.fullmatch(r"\d+ s ago", text(browser, "health-age"))
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(10) == 0

            wait(browser, lambda b: UNREACHABLE.fullmatch(text(b, "health")), "unreachable")
            banner = wait(browser, lambda b: shown(b, "banner"), "the unreachable banner")
            assert "Cannot reach the sidecar since" in banner.text
            said = browser.find_element(By.ID, "banner-text")
            assert re.fullmatch(
                r"The connection failed\. Everything below is what the page last knew"
                r" \(\d+ s ago\): it may serve other rules now, or none\."
                r" Trying again every few seconds\.",
                said.text,
            ), said.text
            known = said.find_element(By.TAG_NAME, "time")  # the age is an element, not its name
            assert re.fullmatch(r"\d+ s ago", known.text)
            assert known.get_attribute("datetime")
            assert browser.title == "Unreachable · rule-sidecar"
            assert re.search(r"last known healthy, \d+ s ago", text(browser, "health-age"))
            assert text(browser, "feed-state") != "connected"
            assert audit(browser) == []
            for button, says in (
                ("validate", "Validate: could not reach"),
                ("reload", "Reload: could not reach"),
            ):
                browser.find_element(By.ID, button).click()
                wait(browser, lambda b, s=says: s in text(b, "action-result"), says)
                assert not busy(browser, button)
                out = browser.find_element(By.ID, "action-result")
                assert out.get_attribute("data-outcome") == "error"
            browser.find_element(By.CSS_SELECTOR, "#try button[type=submit]").click()
            wait(browser, lambda b: "could not reach" in text(b, "try-result"), "try-it error")
            shoot("unreachable")

        mount.publish({"rules.yaml": dump_yaml(make_ruleset_doc("extra"))})
        with serving(tmp_path, mount.root, port=first.port):
            wait(browser, lambda b: text(b, "health") == "healthy", "healthy again")
            wait(browser, lambda b: shown(b, "banner") is None, "no banner")
            wait(browser, lambda b: text(b, "feed-state") == "connected", "the feed again")
            wait(
                browser,
                lambda b: b.find_elements(By.CSS_SELECTOR, '[data-ruleset="extra"]'),
                "the restarted sidecar's rules",
            )
            assert not browser.find_elements(By.CSS_SELECTOR, '[data-ruleset="fraud"]')
            assert text(browser, "version") == "1"
            assert still_same_page(browser)
            browser.find_element(By.ID, "validate").click()
            wait(browser, lambda b: "Valid: 1 rules" in text(b, "action-result"), "validate")
            shoot("back")

    def test_a_sidecar_that_answers_nothing(
        self, browser: WebDriver, mount: ConfigMapDir, tmp_path: Path, shoot: Shoot
    ) -> None:
        """Frozen (SIGSTOP), the sidecar still accepts connections and answers nothing:
        the page's reads time out (8 s) and it says so though the feed never closed; a
        button pressed meanwhile stays busy only until the sidecar answers it."""
        with serving(tmp_path, mount.root) as server:
            open_dashboard(browser, server)
            server.process.send_signal(signal.SIGSTOP)
            try:
                wait(
                    browser,
                    lambda b: UNREACHABLE.fullmatch(text(b, "health")),
                    "unreachable after the reads timed out",
                    seconds=30,
                )
                assert "No answer within 8 s" in text(browser, "banner")
                assert browser.title == "Unreachable · rule-sidecar"
                assert text(browser, "feed-state") != "connected"
                browser.find_element(By.ID, "validate").click()
                assert busy(browser, "validate")
                shoot("frozen")
            finally:
                server.process.send_signal(signal.SIGCONT)
            wait(browser, lambda b: "Valid: 3 rules" in text(b, "action-result"), "validated")
            assert not busy(browser, "validate")
            wait(browser, lambda b: text(b, "health") == "healthy", "healthy again", seconds=15)
            wait(browser, lambda b: shown(b, "banner") is None, "no banner")
            assert text(browser, "feed-state") == "connected"


def many_rulesets(count: int) -> dict[str, str]:
    """`count` files of one ruleset each, `rs-000`, `rs-001`...: two rules each."""
    return {
        f"rs-{n:03d}.yaml": dump_yaml(
            make_ruleset_doc(
                f"rs-{n:03d}",
                [
                    {"id": f"r{n:03d}-a", "condition": "input.amount > 100", "points": 10},
                    {"id": f"r{n:03d}-b", "condition": "input.amount > 500", "points": 20},
                ],
            )
        )
        for n in range(count)
    }


def reads(browser: WebDriver) -> list[str]:
    """The path and query of every request the page made since `forget_reads`."""
    names = browser.execute_script(
        "return performance.getEntriesByType('resource').map((e) => e.name)"
    )
    return [
        urlsplit(name).path + (f"?{urlsplit(name).query}" if "?" in name else "") for name in names
    ]


def forget_reads(browser: WebDriver) -> None:
    browser.execute_script(
        "performance.setResourceTimingBufferSize(100000); performance.clearResourceTimings()"
    )


def first_ruleset(browser: WebDriver) -> str:
    """The id of the first ruleset listed (read in one step: the list is rebuilt as a
    whole when the page turns)."""
    return str(
        browser.execute_script(
            "const block = document.querySelector('#rulesets details');"
            "return block ? block.dataset.ruleset : null"
        )
    )


class TestScale:
    """Many rulesets: the page holds one page of them, collapsed, and reads what changed."""

    def test_collapsed_paged_and_bounded(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir
    ) -> None:
        """The list's size does not grow with the registry: 120 or 480 rulesets, the same
        50 collapsed rulesets and no table until one is opened; never an empty table."""
        sizes = []
        for version, count in ((2, 120), (3, 480)):
            mount.publish(many_rulesets(count))
            browser.get(f"{sidecar.url}/ui/")
            wait(browser, lambda b, v=version: text(b, "version") == str(v), f"version {version}")
            wait(browser, lambda b, c=count: f"in {c} rulesets" in text(b, "rules-summary"), "list")
            blocks = browser.find_elements(By.CSS_SELECTOR, "#rulesets details")
            assert len(blocks) == 50
            assert not any(block.get_attribute("open") for block in blocks)
            assert browser.find_elements(By.CSS_SELECTOR, "#rulesets table") == []
            assert (
                text(browser, "page-position")
                == f"Page 1 of {-(-count // 50)}: rulesets 1 to 50 of {count}"
            )
            sizes.append(
                browser.execute_script(
                    "return [document.querySelectorAll('#rulesets *').length,"
                    " document.querySelectorAll('*').length]"
                )
            )
        assert sizes[0][0] == sizes[1][0]
        assert sizes[1][1] < 2000, sizes  # the page of 5,000 rulesets had 74,298 elements
        rows = expand(browser, "rs-007")
        assert [row.get_attribute("data-rule") for row in rows] == ["r007-a", "r007-b"]
        for table in browser.find_elements(By.CSS_SELECTOR, "#rulesets table"):
            assert table.find_elements(By.CSS_SELECTOR, "tbody tr")
        assert filter_rules(browser, "r300-") == ["r300-a", "r300-b"]
        assert filter_rules(browser, "nothing-has-this") == []
        assert browser.find_elements(By.CSS_SELECTOR, "#rulesets table") == []
        assert text(browser, "rules-summary") == "0 of 960 rules match."

    def test_only_changed_rulesets_are_read_again(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir
    ) -> None:
        """Two rulesets opened; a reload that changes one reads that one again, not the
        other, and never the whole list of rules."""
        files = many_rulesets(120)
        mount.publish(files)
        browser.get(f"{sidecar.url}/ui/")
        wait(browser, lambda b: text(b, "version") == "2", "version 2")
        wait(browser, lambda b: text(b, "feed-state") == "connected", "the live feed")
        expand(browser, "rs-001")
        expand(browser, "rs-002")
        forget_reads(browser)

        files["rs-001.yaml"] = files["rs-001.yaml"].replace("points: 20", "points: 25")
        mount.publish(files)

        wait(browser, lambda b: text(b, "version") == "3", "version 3")
        row = '[data-ruleset="rs-001"] tr[data-rule="r001-b"]'
        wait(browser, lambda b: "25" in b.find_element(By.CSS_SELECTOR, row).text, "25 points")
        wait(browser, lambda b: "/api/v1/rulesets/rs-001" in reads(b), "rs-001 read again")
        made = reads(browser)
        assert made.count("/api/v1/rulesets/rs-001") == 1
        assert "/api/v1/rulesets/rs-002" not in made
        assert not [
            path for path in made if path.startswith("/api/v1/rules?") or path == "/api/v1/rules"
        ]
        assert (
            "20"
            in browser.find_element(
                By.CSS_SELECTOR, '[data-ruleset="rs-002"] tr[data-rule="r002-b"]'
            ).text
        )

    def test_pages_by_keyboard(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir
    ) -> None:
        """Tab from the filter reaches the pages; Enter turns them; the focus never falls
        off a disabled button; a ruleset opens from the keyboard; axe finds nothing."""
        mount.publish(many_rulesets(120))
        browser.get(f"{sidecar.url}/ui/")
        wait(browser, lambda b: text(b, "version") == "2", "version 2")
        wait(browser, lambda b: shown(b, "pages"), "the pages")
        assert browser.find_element(By.ID, "page-previous").get_attribute("disabled")
        browser.find_element(By.ID, "filter").click()
        keys = ActionChains(browser)

        def focused() -> str:
            return str(browser.switch_to.active_element.get_attribute("id"))

        keys.send_keys(Keys.TAB).perform()
        assert focused() == "page-next"
        keys.send_keys(Keys.ENTER).perform()
        wait(browser, lambda b: first_ruleset(b) == "rs-050", "page 2")
        assert text(browser, "page-position") == "Page 2 of 3: rulesets 51 to 100 of 120"
        keys.send_keys(Keys.ENTER).perform()
        wait(browser, lambda b: first_ruleset(b) == "rs-100", "page 3")
        assert browser.find_element(By.ID, "page-next").get_attribute("disabled")
        assert focused() == "page-previous"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#rulesets details")) == 20
        keys.send_keys(Keys.ENTER).perform()
        wait(browser, lambda b: first_ruleset(b) == "rs-050", "page 2 again")
        keys.send_keys(Keys.TAB, Keys.TAB).perform()
        assert browser.switch_to.active_element.text.startswith("rs-050:")
        keys.send_keys(Keys.ENTER).perform()
        wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, 'tr[data-rule="r050-a"]'), "rows")
        assert audit(browser) == []


class TestPanels:
    """What a person does on the page: filter, try, act."""

    def test_try_it_evaluates_pasted_json(
        self, browser: WebDriver, sidecar: ThreadedSidecar, shoot: Shoot
    ) -> None:
        """Paste an input, see the decision, the total and the matched rules."""
        open_dashboard(browser, sidecar)
        Select(browser.find_element(By.ID, "try-ruleset")).select_by_value("fraud")
        field = browser.find_element(By.ID, "try-input")
        field.clear()
        field.send_keys(json.dumps({"amount": 5000, "country": "FR"}))
        browser.find_element(By.CSS_SELECTOR, "#try button[type=submit]").click()
        wait(browser, lambda b: b.find_elements(By.ID, "try-total"), "the evaluation")
        assert text(browser, "try-total") == "70"
        assert text(browser, "try-decision") == "deny"
        matched = text(browser, "try-matched")
        assert "large-amount" in matched
        assert "foreign-country" in matched
        assert "never-on" not in matched
        shoot("try-it")

        field.clear()
        field.send_keys("{not json")
        browser.find_element(By.CSS_SELECTOR, "#try button[type=submit]").click()
        wait(
            browser,
            lambda b: "not JSON" in text(b, "try-result"),
            "the JSON error",
        )
        assert browser.find_element(By.ID, "try-result").get_attribute("data-outcome") == "error"

    def test_filter_narrows_the_rules(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir, shoot: Shoot
    ) -> None:
        """Typing in the filter keeps only the rules that match, across rulesets."""
        mount.publish(
            {
                "rules.yaml": dump_yaml(fraud_doc()),
                "extra.yaml": dump_yaml(make_ruleset_doc("extra")),
            }
        )
        browser.get(f"{sidecar.url}/ui/")
        wait(browser, lambda b: text(b, "version") == "2", "version 2")
        assert filter_rules(browser, "country") == ["foreign-country"]
        assert text(browser, "rules-summary") == "1 of 4 rules match."
        assert filter_rules(browser, "never-on") == ["never-on"]
        row = browser.find_element(By.CSS_SELECTOR, 'tr[data-rule="never-on"]')
        assert row.get_attribute("data-enabled") == "false"
        shoot("filtered")

    def test_validate_reload_and_rollback_buttons(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir
    ) -> None:
        """The buttons call the API and say what happened."""
        open_dashboard(browser, sidecar)
        browser.find_element(By.ID, "validate").click()
        wait(browser, lambda b: "Valid: 3 rules" in text(b, "action-result"), "validate")
        mount.publish({"rules.yaml": dump_yaml(fraud_doc(45))})
        wait(browser, lambda b: text(b, "version") == "2", "version 2")
        browser.find_element(By.ID, "rollback").click()
        browser.switch_to.alert.accept()
        wait(browser, lambda b: "Rollback: success, version 3" in text(b, "action-result"), "rb")
        wait(browser, lambda b: text(b, "version") == "3", "version 3")
        browser.find_element(By.ID, "reload").click()
        wait(browser, lambda b: "Reload: unchanged" in text(b, "action-result"), "reload")

    def test_markup_in_rules_stays_text(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir
    ) -> None:
        """A rule whose name and condition hold HTML shows it as text and runs nothing."""
        markup = "<img src=x onerror=window.pwned=1>"
        rules = [
            {"id": "html", "name": markup, "condition": "input.note == '<b>x</b>'", "points": 1}
        ]
        mount.publish(
            {
                "rules.yaml": dump_yaml(fraud_doc()),
                "x.yaml": dump_yaml(make_ruleset_doc("x", rules)),
            }
        )
        browser.get(f"{sidecar.url}/ui/")
        wait(browser, lambda b: text(b, "version") == "2", "version 2")
        expand(browser, "x")
        row = browser.find_element(By.CSS_SELECTOR, 'tr[data-rule="html"]')
        assert markup in row.text
        assert "input.note == '<b>x</b>'" in row.text
        assert row.find_elements(By.CSS_SELECTOR, "img, b") == []
        explained = try_it(browser, "x", {"note": markup})
        assert explained["html"][-1] == f"input.note = {json.dumps(markup)}"
        assert browser.find_elements(By.CSS_SELECTOR, "#try-result img, #try-result b") == []
        assert browser.execute_script("return window.pwned") is None
        assert console_errors(browser) == []

    def test_shadow_rules_are_marked(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir
    ) -> None:
        """A shadow rule says so in the rules table; an active one has no mark."""
        rules = [
            {"id": "trial", "condition": "input.amount > 1", "points": 9, "mode": "shadow"},
            {"id": "live", "condition": "input.amount > 2", "points": 1},
        ]
        mount.publish(
            {
                "rules.yaml": dump_yaml(fraud_doc()),
                "x.yaml": dump_yaml(make_ruleset_doc("x", rules)),
            }
        )
        browser.get(f"{sidecar.url}/ui/")
        wait(browser, lambda b: text(b, "version") == "2", "version 2")
        expand(browser, "x")
        trial = browser.find_element(By.CSS_SELECTOR, 'tr[data-rule="trial"]')
        assert trial.get_attribute("data-mode") == "shadow"
        assert trial.find_element(By.CSS_SELECTOR, ".shadow").text == "shadow"
        live = browser.find_element(By.CSS_SELECTOR, 'tr[data-rule="live"]')
        assert live.find_elements(By.CSS_SELECTOR, ".shadow") == []
        assert console_errors(browser) == []


class TestAdminToken:
    """With an admin token, reads stay open and the page asks for it where needed."""

    def test_page_asks_for_the_token(
        self, browser: WebDriver, mount: ConfigMapDir, tmp_path: Path, shoot: Shoot
    ) -> None:
        """The live feed and the reload button work once the token is given."""
        token_file = tmp_path / "token"
        token_file.write_text("s3cret-token\n")
        settings = Settings(rules_dirs=(mount.root,), admin_token_file=token_file)
        with threaded_sidecar(settings) as server:
            browser.get(f"{server.url}/ui/")
            wait(browser, lambda b: text(b, "version") == "1", "version 1 (reads are open)")
            dialog = wait(browser, lambda b: shown(b, "token-dialog"), "the token dialog")
            assert text(browser, "feed-state") == "needs the admin token"
            shoot("token-dialog")
            dialog.find_element(By.ID, "token").send_keys("s3cret-token")
            dialog.find_element(By.CSS_SELECTOR, 'button[value="ok"]').click()
            wait(browser, lambda b: text(b, "feed-state") == "connected", "the feed connected")
            browser.find_element(By.ID, "reload").click()
            wait(browser, lambda b: "Reload: unchanged" in text(b, "action-result"), "reload")
            browser.execute_script("sessionStorage.clear()")


def audit(browser: WebDriver) -> list[str]:
    """axe-core's WCAG 2 A and AA violations on the page as it is now."""
    if not AXE.is_file():
        missing(f"needs axe-core at {AXE} (npm install --prefix .ci/node axe-core)")
    browser.execute_script(AXE.read_text("utf-8"))
    result = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {runOnly: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa']})"
        ".then((r) => done(r.violations), (e) => done([{id: 'axe failed', help: String(e),"
        " nodes: []}]));"
    )
    return [f"{v['id']}: {v['help']} at {[n['target'] for n in v['nodes']][:3]}" for v in result]


class TestAccessibility:
    """axe-core's WCAG 2 A and AA rules find nothing, in the calm and the alarmed state."""

    def audit(self, browser: WebDriver) -> list[str]:
        return audit(browser)

    def test_no_violations(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir
    ) -> None:
        """Healthy, then with the failed-reload banner and the try-it answer shown."""
        open_dashboard(browser, sidecar)
        assert self.audit(browser) == []
        mount.publish({"rules.yaml": broken_fraud()})
        wait(browser, lambda b: shown(b, "banner"), "the banner")
        browser.find_element(By.CSS_SELECTOR, "#try button[type=submit]").click()
        wait(browser, lambda b: b.find_elements(By.ID, "try-total"), "the evaluation")
        assert self.audit(browser) == []
        # The audit does look: an image without a text alternative is found.
        browser.execute_script("document.querySelector('main').append(new Image(8, 8))")
        assert [found.split(":")[0] for found in self.audit(browser)] == ["image-alt"]


def evaluate(server: ThreadedSidecar, ruleset_id: str, inputs: list[Any]) -> list[dict[str, Any]]:
    """Evaluate a batch over HTTP, as the sidecar's application does."""
    request = urllib.request.Request(
        f"{server.url}/api/v1/rulesets/{ruleset_id}/evaluate",
        data=json.dumps({"inputs": inputs}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=WAIT_SECONDS) as response:
        results: list[dict[str, Any]] = json.loads(response.read())["results"]
    return results


def try_it(browser: WebDriver, ruleset_id: str, document: Any) -> dict[str, list[str]]:
    """Evaluate `document` in the "Try it" panel; each explained rule's cells by id."""
    Select(browser.find_element(By.ID, "try-ruleset")).select_by_value(ruleset_id)
    field = browser.find_element(By.ID, "try-input")
    field.clear()
    field.send_keys(json.dumps(document))
    browser.execute_script("document.getElementById('try-result').replaceChildren()")
    browser.find_element(By.CSS_SELECTOR, "#try button[type=submit]").click()
    wait(browser, lambda b: b.find_elements(By.ID, "try-explain"), "the explanation")
    return {
        str(row.get_attribute("data-rule")): [
            str(cell.text) for cell in row.find_elements(By.TAG_NAME, "td")
        ]
        for row in browser.find_elements(By.CSS_SELECTOR, "#try-explain tbody tr")
    }


def rule_counts(browser: WebDriver, ruleset_id: str) -> dict[str, tuple[str, str]]:
    """Each rule's (hit rate, errors) cells in an opened ruleset's table."""
    rows = browser.find_elements(By.CSS_SELECTOR, f'[data-ruleset="{ruleset_id}"] tr[data-rule]')
    return {
        str(row.get_attribute("data-rule")): (
            str(row.find_element(By.CSS_SELECTOR, '[data-stat="hit-rate"]').text),
            str(row.find_element(By.CSS_SELECTOR, '[data-stat="errors"]').text),
        )
        for row in rows
    }


def insight(browser: WebDriver, ruleset_id: str) -> str:
    return str(
        browser.find_element(By.CSS_SELECTOR, f'[data-ruleset="{ruleset_id}"] .insight').text
    )


def challenger_doc() -> dict[str, Any]:
    """`fraud-v2`, the challenger of `fraud`: one rule, deny from 500."""
    return make_ruleset_doc(
        "fraud-v2",
        [{"id": "v2-amount", "condition": "input.amount > 500", "points": 70}],
        decisions=[{"decision": "deny", "min_points": 70}],
        default_decision="allow",
        challenger_of="fraud",
    )


# Inputs of the fraud ruleset: deny (70), review (40), allow (30), allow (0), and allow
# with large-amount's condition failing on a string.
FIVE_INPUTS = [
    {"amount": 5000, "country": "FR"},
    {"amount": 5000, "country": "US"},
    {"amount": 10, "country": "FR"},
    {"amount": 10, "country": "US"},
    {"amount": "lots", "country": "US"},
]


class TestInsight:
    """What an opened ruleset's counts say, and why "Try it" answered what it did."""

    def test_hit_rates_and_decision_mix(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir, shoot: Shoot
    ) -> None:
        """Before any evaluation every count is "—"; inputs evaluated by a client show
        in the opened ruleset at its next read (every 10 s), and a collapsed ruleset's
        counts are never read."""
        mount.publish(
            {
                "rules.yaml": dump_yaml(fraud_doc()),
                "extra.yaml": dump_yaml(make_ruleset_doc("extra")),
            }
        )
        browser.get(f"{sidecar.url}/ui/")
        wait(browser, lambda b: text(b, "version") == "2", "version 2")
        forget_reads(browser)
        expand(browser, "fraud")
        wait(browser, lambda b: "No input evaluated since" in insight(b, "fraud"), "no counts")
        assert rule_counts(browser, "fraud") == {
            "large-amount": ("—", "—"),
            "foreign-country": ("—", "—"),
            "never-on": ("—", "—"),
        }
        assert [
            e.text for e in browser.find_elements(By.CSS_SELECTOR, '[data-ruleset="fraud"] th')
        ][-2:] == ["Hit rate", "Errors"]

        decisions = [r["decision"] for r in evaluate(sidecar, "fraud", FIVE_INPUTS)]
        assert decisions == ["deny", "review", "allow", "allow", "allow"]

        wait(
            browser,
            lambda b: rule_counts(b, "fraud")["large-amount"][0] != "—",
            "the counts read again",
            seconds=25,
        )
        assert rule_counts(browser, "fraud") == {
            "large-amount": ("40%\n2 of 5", "1"),
            "foreign-country": ("40%\n2 of 5", "0"),
            "never-on": ("—", "—"),
        }
        block = '[data-ruleset="fraud"]'
        legend = [e.text for e in browser.find_elements(By.CSS_SELECTOR, f"{block} .mix-legend li")]
        assert legend == ["deny: 1 (20%)", "review: 1 (20%)", "allow: 3 (60%)"]
        assert "5 inputs since version 1 went live" in insight(browser, "fraud")
        shares = browser.execute_script(
            "const bar = document.querySelector(arguments[0] + ' .mix-bar');"
            "return [...bar.children].map((part) => [part.textContent,"
            " part.getBoundingClientRect().width / bar.clientWidth])",
            block,
        )
        assert [name for name, _ in shares] == ["deny 20%", "review 20%", "allow 60%"]
        assert [round(share, 2) for _, share in shares] == [0.2, 0.2, 0.6]
        bar = browser.find_element(By.CSS_SELECTOR, f"{block} .mix-bar")
        assert bar.get_attribute("aria-hidden") == "true"  # the legend is what is read
        shoot("counts")
        made = reads(browser)
        assert "/api/v1/rulesets/fraud/stats" in made
        assert not [path for path in made if path.startswith("/api/v1/rulesets/extra")]
        assert console_errors(browser) == []

    def test_challenger_matrix(
        self, browser: WebDriver, sidecar: ThreadedSidecar, mount: ConfigMapDir, shoot: Shoot
    ) -> None:
        """A ruleset and its challenger, both opened: each says which it is, and both
        show the decisions of one against the other; "Try it" shows the challenger's
        answer and the matrices count it at once. axe finds nothing."""
        mount.publish(
            {"rules.yaml": dump_yaml(fraud_doc()), "v2.yaml": dump_yaml(challenger_doc())}
        )
        browser.get(f"{sidecar.url}/ui/")
        wait(browser, lambda b: text(b, "version") == "2", "version 2")
        expand(browser, "fraud")
        expand(browser, "fraud-v2")
        wait(
            browser,
            lambda b: "No input evaluated by both" in insight(b, "fraud"),
            "the challenger named before any evaluation",
        )
        assert "Challenged by fraud-v2" in insight(browser, "fraud")
        assert "Challenger of fraud" in insight(browser, "fraud-v2")
        assert browser.find_elements(By.CSS_SELECTOR, "table.versus") == []

        inputs = [
            {"amount": 5000, "country": "FR"},  # deny, deny
            {"amount": 800, "country": "US"},  # allow (0), deny
            {"amount": 800, "country": "FR"},  # allow (30), deny
        ]
        results = evaluate(sidecar, "fraud", inputs)
        assert [r["challenger"]["decision"] for r in results] == ["deny"] * 3
        try_it(browser, "fraud", {"amount": 10, "country": "US"})  # allow, allow
        assert (
            text(browser, "try-challenger")
            == "Challenger fraud-v2: decision allow, total 0 points (the same decision)."
        )

        for ruleset_id in ("fraud", "fraud-v2"):
            table = f'[data-ruleset="{ruleset_id}"] table.versus'
            wait(
                browser,
                lambda b, t=table: len(b.find_elements(By.CSS_SELECTOR, f"{t} td")) == 4,
                f"the matrix of {ruleset_id}",
            )
            wait(
                browser,
                lambda b, t=table: (
                    b.find_element(By.CSS_SELECTOR, f'{t} tr[data-decision="allow"] td.agree').text
                    == "1"
                ),
                f"the try counted in {ruleset_id}'s matrix",
            )
            cells = {
                (
                    str(cell.find_element(By.XPATH, "..").get_attribute("data-decision")),
                    str(cell.get_attribute("data-challenger-decision")),
                ): cell.text
                for cell in browser.find_elements(By.CSS_SELECTOR, f"{table} td")
            }
            assert cells == {
                ("deny", "deny"): "1",
                ("deny", "allow"): "0",
                ("allow", "deny"): "2",
                ("allow", "allow"): "1",
            }
            caption = browser.find_element(By.CSS_SELECTOR, f"{table} caption").text
            assert caption == "Decisions of fraud (rows) and fraud-v2 (columns)"
            said = browser.find_element(
                By.CSS_SELECTOR, f'[data-ruleset="{ruleset_id}"] .versus-summary'
            ).text
            assert re.fullmatch(
                r"2 of 4 inputs got the same decision from both \(50%\), 2 a different one"
                r" \(counted since fraud's version 1 went live, \d+ s ago\)\.",
                said,
            ), said
        differ = browser.find_elements(By.CSS_SELECTOR, '[data-ruleset="fraud"] td.differ')
        assert [cell.text for cell in differ] == ["2"]
        shoot("challenger")
        assert audit(browser) == []
        assert console_errors(browser) == []

    def test_try_it_explains_each_rule(
        self, browser: WebDriver, sidecar: ThreadedSidecar, shoot: Shoot
    ) -> None:
        """Each rule's outcome, points, mode and the input values it read; a rule's error;
        an input the sidecar refuses, with where; an opened ruleset counts it at once."""
        open_dashboard(browser, sidecar)
        expand(browser, "fraud")
        explained = try_it(browser, "fraud", {"amount": 5000, "country": "FR"})
        assert explained == {
            "large-amount": ["large-amount", "matched", "40", "active", "input.amount = 5000"],
            "foreign-country": [
                "foreign-country",
                "matched",
                "30",
                "active",
                'input.country = "FR"',
            ],
            "never-on": ["never-on", "disabled", "99", "active", "—"],
        }
        outcomes = [
            row.get_attribute("data-outcome")
            for row in browser.find_elements(By.CSS_SELECTOR, "#try-explain tbody tr")
        ]
        assert outcomes == ["matched", "matched", "disabled"]
        assert "Why: 3 rules, 2 matched" in text(browser, "try-result")
        wait(
            browser,
            lambda b: rule_counts(b, "fraud")["large-amount"] == ("100%\n1 of 1", "0"),
            "the evaluation counted in the opened ruleset",
        )

        explained = try_it(browser, "fraud", {"amount": "lots", "country": "FR"})
        error = browser.find_element(
            By.CSS_SELECTOR, '#try-explain tr[data-rule="large-amount"] .rule-error'
        ).text
        assert "overload" in error.lower(), error
        assert explained["large-amount"] == [
            "large-amount",
            f"error\n{error}",
            "40",
            "active",
            'input.amount = "lots"',
        ]
        assert explained["foreign-country"][1] == "matched"
        assert "Why: 3 rules, 1 matched, 1 errored" in text(browser, "try-result")
        shoot("explained")
        assert console_errors(browser) == []

        deep: dict[str, Any] = {}
        for _ in range(40):
            deep = {"a": deep}
        field = browser.find_element(By.ID, "try-input")
        field.clear()
        field.send_keys(json.dumps(deep))
        browser.find_element(By.CSS_SELECTOR, "#try button[type=submit]").click()
        wait(browser, lambda b: "400:" in text(b, "try-result"), "the refusal")
        refused = text(browser, "try-result")
        assert re.fullmatch(r"400: nested deeper than 32 levels \(at \$\.input(\.a)+\)", refused)
        assert browser.find_element(By.ID, "try-result").get_attribute("data-outcome") == "error"
        logged = console_errors(browser)  # Chromium logs the answer's status, nothing else
        assert len(logged) == 1, logged
        assert "evaluate?explain=true - Failed to load resource" in logged[0]
        assert "status of 400" in logged[0]

    def test_first_load_summary_and_wide_layout(
        self, browser: WebDriver, mount: ConfigMapDir, shoot: Shoot
    ) -> None:
        """A first load of 40 rules is one line, each rule a click away; on a 1,400 px
        screen the rules and "Try it" sit side by side near the top, and on a 600 px one
        the cards stack."""
        mount.publish(many_rulesets(20))
        settings = Settings(rules_dirs=(mount.root,), debounce_ms=20)
        with threaded_sidecar(settings) as server:
            browser.set_window_size(1400, 1000)
            try:
                open_dashboard(browser, server)
                assert (
                    text(browser, "changes-summary")
                    == "First load, version 1: 60 changes: 40 rules added in 20 rulesets."
                )
                items = browser.find_elements(By.CSS_SELECTOR, "#changes li")
                assert len(items) == 60
                assert not any(item.is_displayed() for item in items)
                expand(browser, "rs-001")
                width = browser.execute_script("return document.documentElement.clientWidth")
                rules = card(browser, "rules-title")
                tried = card(browser, "try-title")
                assert rules["top"] < 400, rules  # not pushed down by the changes
                assert rules["top"] == tried["top"]
                assert rules["right"] < tried["left"]
                assert tried["right"] > 0.95 * width  # the width is used to its edge
                assert rules["width"] > 0.5 * width
                shoot("wide-1400")

                browser.find_element(By.CSS_SELECTOR, "#changes-body summary").click()
                wait(browser, lambda b: b.find_element(By.ID, "changes").is_displayed(), "list")
                first = browser.find_element(
                    By.CSS_SELECTOR, '#changes li[data-change="rule_added"]'
                )
                assert first.is_displayed()
                assert "input.amount >" in first.text

                browser.set_window_size(600, 1000)
                width = browser.execute_script("return document.documentElement.clientWidth")
                rules = card(browser, "rules-title")
                tried = card(browser, "try-title")
                assert tried["top"] > rules["bottom"]
                assert rules["width"] > 0.9 * width
                shoot("narrow-600")
                assert console_errors(browser) == []
            finally:
                browser.set_window_size(1280, 1800)


def card(browser: WebDriver, title_id: str) -> dict[str, float]:
    """The box of the card a heading titles, in CSS pixels."""
    box: dict[str, float] = browser.execute_script(
        "const r = document.getElementById(arguments[0]).closest('section')"
        ".getBoundingClientRect();"
        "return {top: r.top + scrollY, bottom: r.bottom + scrollY, left: r.left,"
        " right: r.right, width: r.width}",
        title_id,
    )
    return box


# Changing rules of the database source from the page

TOKEN = "edit-token"
MARKUP = "<img src=x onerror=window.pwned=1>"


def paid_doc(points: int = 10) -> dict[str, Any]:
    """`pay`: one rule `pay-big` (`input.amount > 100`) whose embedded test expects
    `points` for an amount of 500."""
    return make_ruleset_doc(
        "pay",
        [{"id": "pay-big", "name": MARKUP, "condition": "input.amount > 100", "points": points}],
        tests=[{"name": "big", "input": {"amount": 500}, "expect": {"total_points": points}}],
    )


@pytest.fixture
def db_sidecar(
    mount: ConfigMapDir, sqlite_database: Database, tmp_path: Path
) -> Iterator[ThreadedSidecar]:
    """Files (`fraud`) and a SQLite database (`pay`, and `open` without tests) with an
    admin token: writes are taken."""
    sqlite_database.init()
    sqlite_database.import_docs(
        paid_doc(), make_ruleset_doc("open", [{"id": "open-a", "condition": "true", "points": 3}])
    )
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    settings = Settings(
        rules_dirs=(mount.root,),
        database_url=sqlite_database.url,
        admin_token_file=token_file,
        debounce_ms=20,
    )
    with threaded_sidecar(settings) as server:
        yield server


def http(
    server: ThreadedSidecar, method: str, path: str, data: str | None = None, **headers: str
) -> tuple[int, Any]:
    """One request as another client would make it, with the admin token: (status, JSON)."""
    request = urllib.request.Request(
        f"{server.url}{path}",
        data=None if data is None else data.encode(),
        headers={"Authorization": f"Bearer {TOKEN}", **headers},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=WAIT_SECONDS) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def open_with_token(browser: WebDriver, server: ThreadedSidecar) -> None:
    """Load /ui/, give the admin token the feed asks for, wait for the feed."""
    browser.get(f"{server.url}/ui/")
    wait(browser, lambda b: text(b, "version") == "1", "version 1")
    dialog = wait(browser, lambda b: shown(b, "token-dialog"), "the token dialog")
    dialog.find_element(By.ID, "token").send_keys(TOKEN)
    dialog.find_element(By.CSS_SELECTOR, 'button[value="ok"]').click()
    wait(browser, lambda b: text(b, "feed-state") == "connected", "the feed connected")


def edit(browser: WebDriver, ruleset_id: str) -> str:
    """Open `ruleset_id` in the editor from its view; the text it shows."""
    expand(browser, ruleset_id)
    block = f'#rulesets details[data-ruleset="{ruleset_id}"]'
    browser.find_element(By.CSS_SELECTOR, f"{block} button.edit").click()
    wait(browser, lambda b: shown(b, "editor"), "the editor")
    return str(browser.find_element(By.ID, "editor-text").get_attribute("value"))


def set_text(browser: WebDriver, value: str) -> None:
    browser.execute_script(
        "const area = document.getElementById('editor-text'); area.value = arguments[0];"
        "area.dispatchEvent(new Event('input'))",
        value,
    )


def editor_says(browser: WebDriver, button: str, expected: str) -> str:
    """Press an editor button; the result once it says `expected`."""
    browser.execute_script("document.getElementById('editor-result').replaceChildren()")
    browser.find_element(By.ID, button).click()
    wait(browser, lambda b: expected in text(b, "editor-result"), expected)
    return text(browser, "editor-result")


def page_faults(browser: WebDriver) -> list[str]:
    """Script errors and Content-Security-Policy refusals the page logged (not the
    answers it was refused: the 401 before the token, a 412 or 422 it showed)."""
    return [
        e
        for e in console_errors(browser)
        if "Failed to load resource" not in e and "WebSocket connection" not in e
    ]


def rule_row(browser: WebDriver, rule_id: str) -> WebElement:
    return browser.find_element(By.CSS_SELECTOR, f'#rulesets tr[data-rule="{rule_id}"]')


class TestEditing:
    """A ruleset of the database edited, checked, saved, created, deleted and its rules
    switched on and off, behind the admin token; files stay read-only."""

    def test_edit_check_and_save(
        self,
        browser: WebDriver,
        db_sidecar: ThreadedSidecar,
        sqlite_database: Database,
        shoot: Shoot,
    ) -> None:
        """The document opens as YAML; Check shows the tests and the changes and writes
        nothing; Save serves it (the evaluation changes), the view shows the new points,
        and the audit row names who; axe finds nothing with the editor open."""
        open_with_token(browser, db_sidecar)
        assert "can be changed here" in text(browser, "writes-note")
        browser.find_element(By.ID, "actor").send_keys("ana")
        original = edit(browser, "pay")
        assert "id: pay-big" in original
        assert "points: 10" in original
        assert MARKUP in original
        assert rule_row(browser, "pay-big").find_elements(By.CSS_SELECTOR, "img") == []
        about = text(browser, "editor-about")
        assert re.match(r"Row version \d+, read at", about), about

        changed = original.replace("points: 10", "points: 12").replace(
            "total_points: 10", "total_points: 12"
        )
        set_text(browser, changed)
        said = editor_says(browser, "editor-check", "Valid: it changes the ruleset.")
        assert "Embedded tests: 1 of 1 passed." in said
        assert "Rules changed: pay-big" in said
        assert evaluate(db_sidecar, "pay", [{"amount": 500}])[0]["total_points"] == 10
        assert audit(browser) == []
        shoot("checked")

        said = editor_says(browser, "editor-save", "Save pay: done")
        assert re.search(r"row version \d+, serving registry version 2", said), said
        assert evaluate(db_sidecar, "pay", [{"amount": 500}])[0]["total_points"] == 12
        wait(browser, lambda b: "12" in rule_row(b, "pay-big").text, "the new points")
        assert sqlite_database.execute("SELECT actor, action FROM rule_sidecar_writes") == [
            ("ana (dashboard)", "replace")
        ]
        # saved again, the new row version is the one it sends
        set_text(browser, changed.replace("priority: 0", "priority: 1"))
        editor_says(browser, "editor-save", "Save pay: done")
        shoot("saved")
        # files stay read-only
        expand(browser, "fraud")
        fraud = browser.find_element(By.CSS_SELECTOR, '#rulesets details[data-ruleset="fraud"]')
        assert "Read-only here: from" in fraud.text
        assert fraud.find_elements(By.CSS_SELECTOR, "button") == []
        assert page_faults(browser) == []

    def test_problems_at_their_line(self, browser: WebDriver, db_sidecar: ThreadedSidecar) -> None:
        """A broken condition: Check and Save (422) name its line and column, the
        location moves the cursor there, and nothing is written."""
        open_with_token(browser, db_sidecar)
        original = edit(browser, "pay")
        lines = original.replace("input.amount > 100", "input.amount >").split("\n")
        line = next(n for n, text_ in enumerate(lines, 1) if "input.amount >" in text_)
        set_text(browser, "\n".join(lines))
        said = editor_says(browser, "editor-check", "Not valid: 1 problem")
        assert f"line {line}:" in said, said
        said = editor_says(browser, "editor-save", "refused, nothing was written")
        assert f"line {line}:" in said, said
        browser.find_element(By.CSS_SELECTOR, "#editor-result button.location").click()
        caret = browser.execute_script(
            "const area = document.getElementById('editor-text');"
            "return area.value.slice(0, area.selectionStart).split('\\n').length"
        )
        assert caret == line
        assert browser.switch_to.active_element.get_attribute("id") == "editor-text"
        assert evaluate(db_sidecar, "pay", [{"amount": 500}])[0]["total_points"] == 10

    def test_a_stale_save_says_so_and_loads_the_current_version(
        self, browser: WebDriver, db_sidecar: ThreadedSidecar, shoot: Shoot
    ) -> None:
        """Changed through the API after the editor read it: Save answers 412, the page
        says someone else changed it, and loads the current version when asked."""
        open_with_token(browser, db_sidecar)
        original = edit(browser, "pay")
        status, read = http(db_sidecar, "GET", "/api/v1/rulesets/pay")
        behind = dump_yaml(paid_doc(20))
        status, answer = http(
            db_sidecar,
            "PUT",
            "/api/v1/rulesets/pay",
            behind,
            **{"Content-Type": "application/yaml", "If-Match": f'"{read["row_version"]}"'},
        )
        assert status == 200, answer
        set_text(browser, original.replace("name: pay", "name: mine"))
        said = editor_says(browser, "editor-save", "Someone else changed it")
        assert f"it is now at row version {answer['row_version']}" in said
        assert "Your text is still here." in said
        assert "name: mine" in str(
            browser.find_element(By.ID, "editor-text").get_attribute("value")
        )
        shoot("stale")
        browser.find_element(By.ID, "editor-reload").click()
        wait(
            browser,
            lambda b: (
                "points: 20" in str(b.find_element(By.ID, "editor-text").get_attribute("value"))
            ),
            "the current version",
        )
        assert f"Row version {answer['row_version']}" in text(browser, "editor-about")
        assert evaluate(db_sidecar, "pay", [{"amount": 500}])[0]["total_points"] == 20

    def test_disable_and_enable_a_rule(
        self, browser: WebDriver, db_sidecar: ThreadedSidecar, shoot: Shoot
    ) -> None:
        """The toggle of a rule writes it; one that would break an embedded test is
        refused with the test's problem, and nothing changes."""
        open_with_token(browser, db_sidecar)
        expand(browser, "open")
        rule_row(browser, "open-a").find_element(By.CSS_SELECTOR, "button.toggle").click()
        wait(
            browser,
            lambda b: rule_row(b, "open-a").get_attribute("data-enabled") == "false",
            "open-a disabled",
        )
        assert evaluate(db_sidecar, "open", [{}])[0]["total_points"] == 0
        toggle = rule_row(browser, "open-a").find_element(By.CSS_SELECTOR, "button.toggle")
        assert toggle.text == "Enable"
        assert toggle.get_attribute("aria-label") == "Enable open-a"
        toggle.click()
        wait(
            browser,
            lambda b: rule_row(b, "open-a").get_attribute("data-enabled") == "true",
            "open-a enabled",
        )
        assert evaluate(db_sidecar, "open", [{}])[0]["total_points"] == 3

        expand(browser, "pay")
        rule_row(browser, "pay-big").find_element(By.CSS_SELECTOR, "button.toggle").click()
        block = '#rulesets details[data-ruleset="pay"] .write-note'
        note = wait(
            browser,
            lambda b: b.find_element(By.CSS_SELECTOR, block).text,
            "the refusal",
        )
        assert "Disable pay-big: refused, nothing was written" in note, note
        assert "total_points" in note
        assert rule_row(browser, "pay-big").get_attribute("data-enabled") == "true"
        shoot("toggles")
        assert audit(browser) == []

    def test_create_then_delete(
        self, browser: WebDriver, db_sidecar: ThreadedSidecar, shoot: Shoot
    ) -> None:
        """New ruleset (If-None-Match: *) serves at once; again with the same id is
        refused; Delete asks first, then it is gone."""
        open_with_token(browser, db_sidecar)
        browser.find_element(By.ID, "new-ruleset").click()
        wait(browser, lambda b: shown(b, "editor"), "the editor")
        assert browser.switch_to.active_element.get_attribute("id") == "editor-id"
        field = browser.find_element(By.ID, "editor-id")
        field.clear()
        field.send_keys("fresh")
        set_text(
            browser,
            dump_yaml(
                make_ruleset_doc("fresh", [{"id": "fresh-a", "condition": "true", "points": 4}])
            ),
        )
        editor_says(browser, "editor-check", "Valid: it adds the ruleset.")
        editor_says(browser, "editor-save", "Save fresh: done")
        assert evaluate(db_sidecar, "fresh", [{}])[0]["total_points"] == 4
        wait(
            browser,
            lambda b: b.find_elements(By.CSS_SELECTOR, '#rulesets details[data-ruleset="fresh"]'),
            "the new ruleset listed",
        )
        assert text(browser, "editor-title") == "Edit ruleset fresh"

        browser.find_element(By.ID, "editor-close").click()
        assert not browser.find_element(By.ID, "editor").is_displayed()
        browser.find_element(By.ID, "new-ruleset").click()
        field = browser.find_element(By.ID, "editor-id")
        field.clear()
        field.send_keys("fresh")
        set_text(browser, dump_yaml(make_ruleset_doc("fresh")))
        editor_says(browser, "editor-save", "a ruleset fresh exists already")
        browser.execute_script("document.getElementById('editor').hidden = true")

        expand(browser, "fresh")
        delete = '#rulesets details[data-ruleset="fresh"] button.delete'
        browser.find_element(By.CSS_SELECTOR, delete).click()
        browser.switch_to.alert.dismiss()
        assert http(db_sidecar, "GET", "/api/v1/rulesets/fresh")[0] == 200
        browser.find_element(By.CSS_SELECTOR, delete).click()
        assert "Delete the ruleset fresh" in browser.switch_to.alert.text
        browser.switch_to.alert.accept()
        wait(browser, lambda b: "Delete fresh: done" in text(b, "write-result"), "deleted")
        wait(
            browser,
            lambda b: not b.find_elements(By.CSS_SELECTOR, '[data-ruleset="fresh"]'),
            "the ruleset gone",
        )
        assert http(db_sidecar, "GET", "/api/v1/rulesets/fresh")[0] == 404
        shoot("deleted")

    def test_markup_in_problems_stays_text(
        self, browser: WebDriver, db_sidecar: ThreadedSidecar
    ) -> None:
        """Markup in what the sidecar says of a document (a message quoting it) and in
        the document itself is shown as text and runs nothing."""
        open_with_token(browser, db_sidecar)
        original = edit(browser, "pay")
        set_text(browser, original.replace("id: pay\n", f"id: '{MARKUP}'\n", 1))
        said = editor_says(browser, "editor-check", "Not valid")
        assert MARKUP in said, said
        editor_says(browser, "editor-save", "refused")
        assert browser.find_elements(By.CSS_SELECTOR, "#editor-result img, #rulesets img") == []
        assert browser.execute_script("return window.pwned") is None
        assert page_faults(browser) == []

    def test_no_controls_without_a_database(
        self, browser: WebDriver, sidecar: ThreadedSidecar, shoot: Shoot
    ) -> None:
        """Without a database source the page offers no change and says why."""
        open_dashboard(browser, sidecar)
        wait(browser, lambda b: "Changing rules here is off" in text(b, "writes-note"), "why not")
        assert "writes need a database source" in text(browser, "writes-note")
        assert not browser.find_element(By.ID, "new-ruleset").is_displayed()
        assert not browser.find_element(By.ID, "actor").is_displayed()
        expand(browser, "fraud")
        fraud = browser.find_element(By.CSS_SELECTOR, '#rulesets details[data-ruleset="fraud"]')
        assert "Read-only here: from" in fraud.text
        assert fraud.find_elements(By.CSS_SELECTOR, "button") == []
        shoot("read-only")
        assert audit(browser) == []
