"""Screenshot of the running demo for README (headless Debian chromium via Playwright).

python -m mmsink.demo.screenshot --out docs/demo.png [--sample 0] [--budget 64]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from mmsink.demo.app import DEFAULT_MODEL, SAMPLES, Runner, serve_in_background


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="docs/demo.png")
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--sample", type=int, default=0)
    ap.add_argument("--budget", default="64")
    a = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    app, port = serve_in_background(Runner(a.model))
    question = json.loads((SAMPLES / "samples.json").read_text())[a.sample]["question"]
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1366, "height": 900})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
            page.get_by_text(question).first.click()
            page.wait_for_function(
                "document.querySelector('#question textarea, #question input').value !== ''"
            )
            page.locator("#budget input").fill(a.budget)
            page.locator("#run").click()
            page.wait_for_function(
                "(document.querySelector('#info') || {innerText: ''}).innerText.includes('saved')",
                timeout=120000,
            )
            time.sleep(1.0)  # let the plot and overlay paint
            page.screenshot(path=a.out, full_page=True)
            browser.close()
    finally:
        app.close()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
