"""Drive `ddpm-hf demo` in headless Chromium: start it, generate in the page, and save a screenshot.

    python scripts/demo_screenshot.py --model ddpm-cifar10-quickstart --sampler ddpm --steps 1000 --out docs/images/demo.png

This made the README's docs/images/demo.png, and tests/test_demo.py drives the page with the same functions. It needs
selenium (the test extra) and a Chromium with its driver on PATH: Debian's `chromium` and `chromium-driver`, which
.ci/run installs. Nothing is downloaded: Selenium is given both binaries, and the browser runs with its background
networking off.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import numpy as np

# Chromium as root, in a container, without a display or a network: what it needs to start, and to stay quiet.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
READY_LINE = "Ctrl-C stops it"  # what `ddpm-hf demo` prints, with its URL, once it serves

# Every change of the step counter, of the live x_t picture and of the samples, with the time it happened: what the
# page showed while it sampled, in order.
WATCH_PAGE = """
window.demoEvents = [];
const record = () => {
    const step = document.querySelector('#steps-done');
    const live = document.querySelector('#live-x-t img');
    const samples = document.querySelectorAll('#samples img').length;
    const last = window.demoEvents[window.demoEvents.length - 1];
    const event = {step: step ? step.textContent : null, live: live ? live.src : null, samples: samples};
    if (!last || last.step !== event.step || last.live !== event.live || last.samples !== event.samples) {
        window.demoEvents.push(Object.assign(event, {time: performance.now()}));
    }
};
new MutationObserver(record).observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
"""


def find_chromium() -> tuple[str, str] | None:
    """(chromium, chromedriver) on PATH, or None."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 1000):
    """A headless Chromium driven by Selenium, in a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("no Chromium and chromedriver on PATH: install Debian's chromium and chromium-driver.")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def demo_server(model: str, env: dict | None = None, timeout: float = 240):
    """`ddpm-hf demo --model MODEL` in a process of its own; yields its URL once it serves."""
    command = [sys.executable, "-m", "ddpm_hf", "demo", "--model", model, "--port", str(free_port())]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:  # keep draining the output, so that the server never blocks on a full pipe
        for line in process.stdout:
            lines.append(line)
            if READY_LINE in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not ready.wait(timeout) or process.poll() is not None:
            raise RuntimeError(f"`{' '.join(command)}` did not start:\n{''.join(lines)}")
        yield next(word for line in lines if READY_LINE in line for word in line.split() if word.startswith("http://")).rstrip("/")
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for(driver, css: str, timeout: float = 60):
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout).until(expected_conditions.presence_of_element_located(("css selector", css)))


def set_number(driver, elem_id: str, value) -> None:
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element("css selector", f"#{elem_id} input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def open_dropdown(driver, elem_id: str, timeout: float = 60) -> list:
    """Open a Gradio dropdown as a visitor does (a click on it) and return its entries. Until the page's scripts
    have started, a click does nothing: click again."""
    deadline = time.monotonic() + timeout
    while True:
        driver.find_element("css selector", f"#{elem_id} input").click()
        try:
            wait_for(driver, f"#{elem_id} [role=option]", timeout=2)
            return driver.find_elements("css selector", f"#{elem_id} [role=option]")
        except Exception:
            if time.monotonic() > deadline:
                raise


def dropdown_options(driver, elem_id: str) -> list[str]:
    """The choices a Gradio dropdown lists when opened (then closed again)."""
    from selenium.webdriver.common.keys import Keys

    options = [entry.get_attribute("aria-label") for entry in open_dropdown(driver, elem_id)]
    driver.find_element("css selector", f"#{elem_id} input").send_keys(Keys.ESCAPE)
    return options


def choose(driver, elem_id: str, option: str) -> None:
    """Pick `option` in a Gradio dropdown: open it, click the entry."""
    next(entry for entry in open_dropdown(driver, elem_id) if entry.get_attribute("aria-label") == option).click()


def generate(driver, settings: dict, num_images: int, timeout: float = 180) -> list[dict]:
    """Fill in the page (numbers and dropdowns by elem_id), press Generate, wait for the `num_images` samples; the
    page's changes meanwhile (`WATCH_PAGE`), oldest first."""
    from selenium.webdriver.support.ui import WebDriverWait

    for elem_id, value in settings.items():
        if elem_id in ("sampler", "class"):
            choose(driver, elem_id, value)
        else:
            set_number(driver, elem_id, value)
    driver.execute_script(WATCH_PAGE)
    driver.find_element("css selector", "#generate").click()
    WebDriverWait(driver, timeout).until(lambda d: len(d.find_elements("css selector", "#samples img")) >= num_images)
    time.sleep(0.5)  # the summary and the download button follow the samples
    return driver.execute_script("return window.demoEvents;")


def sample_pictures(driver) -> list[np.ndarray]:
    """The samples the page shows, as the pixels it was sent (H x W x 3 uint8)."""
    from PIL import Image

    sources = [image.get_attribute("src") for image in driver.find_elements("css selector", "#samples img")]
    return [np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(source).read())).convert("RGB")) for source in sources]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="Training OUTPUT_DIR or Hub id.")
    parser.add_argument("--out", default="docs/images/demo.png")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--height", type=int, default=1450, help="Of the window, in pixels (the width is 1400).")
    args = parser.parse_args()
    settings = {"sampler": args.sampler, "steps-input": args.steps, "seed": args.seed, "num-images": args.num_images}
    with demo_server(args.model, env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False")) as url, chromium(1400, args.height) as driver:
        driver.get(url)
        wait_for(driver, "#generate")
        generate(driver, settings, args.num_images, timeout=1800)
        driver.save_screenshot(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
