"""Dashboard at scale: what 5,000 rulesets cost the page a person keeps open.

A real `rule-sidecar serve` on a ConfigMap-style directory of 5,000 generated rulesets (two
rules each, one file each), the page in headless Chromium driven over the DevTools
protocol (through chromedriver). Printed, for the page as it settles after loading:

- DOM nodes (CDP `Performance.getMetrics` "Nodes") and elements, and the page's height;
- the time to clear the filter: from emptying the field (after filtering on a word that
  matches a few rules) to the next frame painted with the unfiltered list, and the
  longest task on the main thread meanwhile (what a person feels as a frozen page);
- per reload (a `..data` swap that changes one rule's points, 3 times): the time from the
  swap to the new version in the page's header (mostly the sidecar's own reload of 5,000
  files), and the reads the page made for it: how many, the bytes transferred, and the
  time from the first one's start to the last one's end. Health and status are left out
  of these: both pages read them on a reload, and the new one also every 5 s.

`--code DIR` runs the sidecar (and so the page it serves) from another checkout, for a
before/after on the same machine:

    .venv/bin/python -m bench.ui_scale --code /work/main    # before
    .venv/bin/python -m bench.ui_scale                      # after
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench._common import environment, free_port, sidecar_process, wait_ready
from bench._gen import generate_files
from sidecar.testing import ConfigMapDir

RULESETS = 5_000
RULES_PER_SET = 2
RELOADS = 3
NEEDLE = "r00042-"  # the two rules of one ruleset

SETTLED = """
const done = arguments[arguments.length - 1];
let last = -1, quiet = 0;
const timer = setInterval(() => {
  const count = performance.getEntriesByType("resource").length;
  quiet = count === last ? quiet + 1 : 0;
  last = count;
  if (quiet >= 10) { clearInterval(timer); requestAnimationFrame(() => done(count)); }
}, 100);
"""

CLEAR_FILTER = """
const done = arguments[arguments.length - 1];
const field = document.getElementById("filter");
const summary = document.getElementById("rules-summary");
let longest = 0;
const observer = new PerformanceObserver((list) => {
  for (const entry of list.getEntries()) longest = Math.max(longest, entry.duration);
});
observer.observe({ type: "longtask" });
const started = performance.now();
field.value = "";
field.dispatchEvent(new Event("input", { bubbles: true }));
const check = () => {
  if (/match/.test(summary.textContent)) { requestAnimationFrame(check); return; }
  requestAnimationFrame(() => setTimeout(() => {
    observer.disconnect();
    done([performance.now() - started, longest]);
  }, 0));
};
requestAnimationFrame(check);
"""

RELOAD_READS = """
return performance.getEntriesByType("resource")
  .filter((e) => e.initiatorType === "fetch" && !/health|status/.test(e.name))
  .map((e) => [e.transferSize, e.startTime, e.responseEnd]);
"""


def volume_files(bump: int = 0) -> dict[str, str]:
    """One file per ruleset; `bump` > 0 prefixes the first rule's points with its digits."""
    generated = generate_files(RULESETS * RULES_PER_SET, RULES_PER_SET)
    files = {f.name: f.content.decode() for f in generated}
    if bump:
        first = sorted(files)[0]
        files[first] = files[first].replace("points: ", f"points: {bump}", 1)
    return files


def spread(seconds: list[float]) -> str:
    return (
        f"median {statistics.median(seconds) * 1e3:,.0f} ms "
        f"[{min(seconds) * 1e3:,.0f}..{max(seconds) * 1e3:,.0f}]"
    )


def browser_figures(base: str, volume: ConfigMapDir) -> list[str]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or ""
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1800")
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path=shutil.which("chromedriver"))
    )
    driver.set_script_timeout(120)

    def text(element_id: str) -> str:
        return str(
            driver.execute_script(f"return document.getElementById('{element_id}').textContent")
        )

    def until(check: Any, what: str, seconds: float = 120.0) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never showed {what}")
            time.sleep(0.02)

    lines = []
    try:
        driver.execute_cdp_cmd("Performance.enable", {})
        driver.get(f"{base}/ui/")
        until(lambda: text("version") == "1", "version 1")
        until(lambda: text("feed-state") == "connected", "the live feed")
        driver.execute_async_script(SETTLED)
        metrics = {
            m["name"]: m["value"]
            for m in driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]
        }
        elements = driver.execute_script("return document.querySelectorAll('*').length")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        lines.append(
            f"  settled page: {int(metrics['Nodes']):,} DOM nodes (CDP), {elements:,} elements, "
            f"{height:,} px tall"
        )

        field = driver.find_element("id", "filter")
        field.send_keys(NEEDLE)
        until(lambda: "match" in text("rules-summary"), "the filtered list")
        driver.execute_async_script(SETTLED)
        cleared, longest = driver.execute_async_script(CLEAR_FILTER)
        lines.append(
            f"  clearing the filter {NEEDLE!r}: {cleared:,.0f} ms to the unfiltered list painted, "
            f"longest main-thread task {longest:,.0f} ms"
        )

        shown, seconds, sizes, counts = [], [], [], []
        for serial in range(1, RELOADS + 1):
            version = int(text("version"))
            driver.execute_script("performance.clearResourceTimings()")
            started = time.perf_counter()
            volume.publish(volume_files(bump=serial))
            wanted = str(version + 1)
            until(lambda wanted=wanted: text("version") == wanted, f"version {wanted}")
            shown.append(time.perf_counter() - started)
            driver.execute_async_script(SETTLED)
            reads = driver.execute_script(RELOAD_READS)
            seconds.append((max(end for *_, end in reads) - min(s for _, s, _ in reads)) / 1000)
            sizes.append(sum(size for size, *_ in reads))
            counts.append(len(reads))
        lines.append(
            f"  per reload (n={RELOADS}): swap to the new version shown {spread(shown)}; "
            f"the page's reads: {statistics.median(counts):.0f} requests, {spread(seconds)}, "
            f"{statistics.median(sizes):,.0f} bytes transferred [{min(sizes):,}..{max(sizes):,}]"
        )
    finally:
        driver.quit()
    return lines


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--code", type=Path, help="run the sidecar from this checkout")
    args = parser.parse_args()
    print(environment())
    # `python -m` puts its working directory first on the path: run it in the checkout.
    extra = {"PYTHONPATH": str(args.code.resolve())} if args.code else {}
    prefix = ["env", f"--chdir={args.code.resolve()}"] if args.code else []
    code = args.code or "this checkout"
    print(f"sidecar code: {code}; {RULESETS:,} rulesets of {RULES_PER_SET} rules")
    with tempfile.TemporaryDirectory() as tmp:
        volume = ConfigMapDir(Path(tmp) / "rules")
        volume.publish(volume_files())
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with sidecar_process(
            port,
            "--rules-dir",
            str(volume.root),
            prefix=prefix,
            RULE_SIDECAR_LOG_LEVEL="ERROR",
            **extra,
        ):
            async with aiohttp.ClientSession() as session:
                await wait_ready(session, base, time.monotonic() + 300)
            for line in await asyncio.to_thread(browser_figures, base, volume):
                print(line)


if __name__ == "__main__":
    asyncio.run(main())
