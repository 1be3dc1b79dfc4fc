"""The web page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`) driven by
Selenium against uvicorn on a loopback port. Upload an image, wait for the overlay, read the legend."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
selenium = pytest.importorskip("selenium")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    pytest.skip(
        "chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402
from test_serve import RG_META, RedVsGreen  # noqa: E402  (tests/ is on sys.path under pytest)

from pixelwise.serve import bind_socket  # noqa: E402
from pixelwise.serve.app import create_app  # noqa: E402


@pytest.fixture
def server_url():
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(RedVsGreen(), RG_META), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def browser():
    profile = tempfile.mkdtemp(prefix="pixelwise-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1200,800",
    ):
        options.add_argument(flag)
    # an explicit driver and browser path: Selenium Manager never runs, nothing is downloaded
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def scene(h: int = 120, w: int = 180) -> np.ndarray:
    """A greenish field with a reddish disc: class "red" inside the disc, "green" outside."""
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - 60) ** 2 + (xx - 70) ** 2 < 45**2
    img = np.empty((h, w, 3), np.uint8)
    img[...] = (40, 170, 70)
    img[disc] = (210, 60, 50)
    return img


def test_upload_shows_overlay_and_legend(server_url, browser, tmp_path):
    img = scene()
    path = tmp_path / "scene.png"
    Image.fromarray(img).save(path)
    red_share = float((img[..., 0] > img[..., 1]).mean())

    browser.get(server_url)
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "ready")
    assert "red_vs_green" in browser.find_element(By.ID, "model").text

    browser.find_element(By.ID, "file").send_keys(str(path))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done", browser.find_element(
        By.ID, "status"
    ).text

    mask = browser.find_element(By.ID, "mask")
    assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", mask) == [180, 120]
    # the browser decoded the palette PNG: class colours at a disc pixel and a field pixel
    colours = browser.execute_script(
        """
        const img = arguments[0], c = document.createElement('canvas');
        c.width = img.naturalWidth; c.height = img.naturalHeight;
        const g = c.getContext('2d'); g.drawImage(img, 0, 0);
        return [Array.from(g.getImageData(70, 60, 1, 1).data), Array.from(g.getImageData(170, 5, 1, 1).data)];
    """,
        mask,
    )
    assert colours == [[255, 0, 0, 255], [0, 255, 0, 255]]

    rows = browser.find_elements(By.CSS_SELECTOR, "#legend li")
    legend = [(r.get_attribute("data-name"), float(r.get_attribute("data-fraction")), r.text) for r in rows]
    assert [name for name, _, _ in legend] == ["green", "red"]  # sorted by share, largest first
    assert legend[0][1] == pytest.approx(1 - red_share, abs=1e-6)
    assert legend[1][1] == pytest.approx(red_share, abs=1e-6)
    assert f"{100 * red_share:.1f} %" in legend[1][2]

    slider = browser.find_element(By.ID, "opacity")
    slider.send_keys(Keys.END)
    assert mask.value_of_css_property("opacity") == "1"
    slider.send_keys(Keys.HOME)
    assert mask.value_of_css_property("opacity") == "0"
    for _ in range(3):
        slider.send_keys(Keys.RIGHT)
    assert float(mask.value_of_css_property("opacity")) == pytest.approx(0.03)
    slider.send_keys(Keys.HOME, *[Keys.PAGE_UP] * 5)  # 50 %: the overlay as a user sees it
    browser.save_screenshot(str(tmp_path / "page.png"))
    shot = Image.open(tmp_path / "page.png")
    assert shot.size[0] >= 800 and shot.getextrema() != ((255, 255), (255, 255), (255, 255))
    print(f"screenshot: {tmp_path / 'page.png'}")

    # a file that is not an image: the page shows the service's one-line error
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not a PNG")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "error")
    status = browser.find_element(By.ID, "status")
    assert "415" in status.text and "not recognised" in status.text and status.get_attribute("class") == "error"
