"""Dashboard: its weight, the reads it makes, and how fast a change becomes visible on it.

A real `rule-sidecar serve` on a ConfigMap-style directory of generated rules (300 and
10,000 rules, 100 per file). For each size:

1. the reads the page makes on every refresh (health, status, the first page of
   rulesets, history?limit=25, changes?limit=100): server time and bytes of each, median of 20
   (plain GETs without If-None-Match, as after a change);
2. in headless Chromium (Debian's `chromium` + `chromium-driver`; skipped without them):
   page load to the rules table filled, median of 5; then a `..data` swap that changes one
   rule's points, timed from the swap to the new version shown in the page's header
   (polled every few ms through WebDriver, which adds its own 2-5 ms), median of 10.

    /work/venv/bin/python -m bench.dashboard
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bench._common import environment, free_port, sidecar_process, wait_ready
from bench._gen import generate_files
from sidecar.api.ui import STATIC
from sidecar.testing import ConfigMapDir

HOT = "/api/v1/rules/hot-reload"
READS = (
    "/health/hot-reload",
    f"{HOT}/status",
    "/api/v1/rulesets?offset=0&limit=50",
    f"{HOT}/history?limit=25",
    f"{HOT}/changes?limit=100",
)
SIZES = (300, 10_000)


def rules_volume(total: int, bump: int = 0) -> dict[str, str]:
    """The generated files; `bump` > 0 prefixes the first rule's points with its digits."""
    files = {f.name: f.content.decode() for f in generate_files(total, 100)}
    if bump:
        first = sorted(files)[0]
        files[first] = files[first].replace("points: ", f"points: {bump}", 1)
    return files


async def time_reads(base: str) -> list[str]:
    lines = []
    async with aiohttp.ClientSession() as session:
        for path in READS:
            seconds, size = [], 0
            for _ in range(20):
                started = time.perf_counter()
                async with session.get(base + path) as response:
                    body = await response.read()
                seconds.append(time.perf_counter() - started)
                size = len(body)
            lines.append(
                f"  GET {path:<42} median {statistics.median(seconds) * 1e3:7.2f} ms"
                f"  [min {min(seconds) * 1e3:.2f} max {max(seconds) * 1e3:.2f}]  {size:>9,} bytes"
            )
    return lines


def browser_figures(base: str, volume: ConfigMapDir, total: int) -> list[str]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path=shutil.which("chromedriver"))
    )

    def shown(script: str, expected: str, deadline_s: float = 30.0) -> None:
        deadline = time.monotonic() + deadline_s
        while driver.execute_script(script) != expected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never showed {expected!r}")

    try:
        loads = []
        for _ in range(5):
            started = time.perf_counter()
            driver.get(f"{base}/ui/")
            shown(
                "return document.getElementById('rules-summary').textContent.split(' ')[0]",
                f"{total}",
            )
            loads.append(time.perf_counter() - started)
        shown("return document.getElementById('feed-state').textContent", "connected")
        visible = []
        for serial in range(1, 11):
            version = int(
                driver.execute_script("return document.getElementById('version').textContent")
            )
            started = time.perf_counter()
            volume.publish(rules_volume(total, bump=serial))
            shown("return document.getElementById('version').textContent", str(version + 1))
            visible.append(time.perf_counter() - started)
    finally:
        driver.quit()
    return [
        f"  page load to the rules table: median {statistics.median(loads) * 1e3:.0f} ms "
        f"[min {min(loads) * 1e3:.0f} max {max(loads) * 1e3:.0f}] n=5",
        f"  swap to the new version on the page: median {statistics.median(visible) * 1e3:.0f} ms "
        f"[min {min(visible) * 1e3:.0f} max {max(visible) * 1e3:.0f}] n=10",
    ]


async def main() -> None:
    print(environment())
    weight = {path.name: path.stat().st_size for path in sorted(STATIC.iterdir())}
    print(
        "dashboard files: "
        + ", ".join(f"{name} {size:,} B" for name, size in weight.items())
        + f"; {sum(weight.values()):,} B in all, uncompressed"
    )
    has_browser = shutil.which("chromium") and shutil.which("chromedriver")
    for total in SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            volume = ConfigMapDir(Path(tmp) / "rules")
            volume.publish(rules_volume(total))
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            with sidecar_process(
                port, "--rules-dir", str(volume.root), RULE_SIDECAR_LOG_LEVEL="ERROR"
            ):
                async with aiohttp.ClientSession() as session:
                    await wait_ready(session, base, time.monotonic() + 120)
                print(f"{total:,} rules: the reads of one refresh")
                for line in await time_reads(base):
                    print(line)
                if has_browser:
                    for line in await asyncio.to_thread(browser_figures, base, volume, total):
                        print(line)
                else:
                    print("  (no chromium + chromedriver: browser figures skipped)")


if __name__ == "__main__":
    asyncio.run(main())
