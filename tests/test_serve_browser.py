"""The page of `fusion serve` in a real headless browser: Debian's chromium driven by Selenium through Debian's
chromedriver (no driver or browser is downloaded). `.ci/run` installs both when they are missing; under CI=true a
missing browser fails these tests instead of skipping them, so CI never passes without having run them."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from serve_fixtures import make_tiny_run, running_server

from fusion.app.serve.limits import ServeLimits
from fusion.app.serve.server import create_app
from fusion.app.predictor import Predictor
from fusion.labels import LABELS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.usefixtures("one_thread")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1000,900")


def missing_browser(chromium: str = CHROMIUM, chromedriver: str = CHROMEDRIVER) -> str | None:
    """Why the browser cannot run here, or None."""
    absent = [name for name, path in (("chromium", chromium), ("chromium-driver", chromedriver))
              if not Path(path).exists()]
    return f"Debian's {' and '.join(absent)} not installed (.ci/run installs them: apt-get install chromium " \
           f"chromium-driver)" if absent else None


def require_browser(reason: str | None, ci: str | None) -> None:
    """Nothing when the browser is there; else a failure under CI (CI=true or 1), a skip on a developer's machine."""
    if reason is None:
        return
    if (ci or "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI={ci}: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser_present():
    require_browser(missing_browser(), os.environ.get("CI"))


def test_a_missing_browser_fails_under_ci_and_skips_elsewhere(tmp_path):
    reason = missing_browser(str(tmp_path / "chromium"), CHROMEDRIVER)
    assert reason and "chromium not installed" in reason
    with pytest.raises(pytest.fail.Exception, match="CI=true: Debian's chromium"):
        require_browser(reason, "true")
    with pytest.raises(pytest.skip.Exception):
        require_browser(reason, None)
    require_browser(None, "true")  # present: runs


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_models):
    tiny = make_tiny_run(tmp_path_factory.mktemp("browser"), tiny_models)
    model = Predictor.load(tiny.run, device="cpu")
    with running_server(create_app(model, ServeLimits(max_upload_bytes=2**20))) as url:
        yield url, model, tiny


@pytest.fixture(scope="module")
def served_tokens(tmp_path_factory, tiny_models):
    """A dual_attn run trained on token sequences: its answers carry the attention over words and patches."""
    tiny = make_tiny_run(tmp_path_factory.mktemp("browser-tokens"), tiny_models, head="dual_attn", tokens=True)
    model = Predictor.load(tiny.run, device="cpu")
    with running_server(create_app(model, ServeLimits(max_upload_bytes=2**20))) as url:
        yield url, model, tiny


@pytest.fixture(scope="module")
def driver(tmp_path_factory, browser_present):
    """One browser for the module (starting chromium is most of a test's time), with a fresh profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield browser
    browser.quit()


def _submit(driver, url: str, image: Path, text: str) -> str:
    """Fills the page's form as a user does; returns the state the page reaches (answered or refused)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "run").text not in ("", "…"))
    driver.find_element(By.ID, "image").send_keys(str(image))
    driver.find_element(By.ID, "text").send_keys(text)
    driver.find_element(By.ID, "submit").click()
    body = driver.find_element(By.TAG_NAME, "body")
    WebDriverWait(driver, 60).until(lambda d: body.get_attribute("data-state") in ("answered", "refused"))
    return body.get_attribute("data-state")


def test_the_page_shows_the_label_and_three_probability_bars_of_a_post(served, driver):
    from selenium.webdriver.common.by import By

    url, model, tiny = served
    assert _submit(driver, url, tiny.images[0], tiny.texts[0]) == "answered"
    label = driver.find_element(By.ID, "label").get_attribute("textContent")
    rows = driver.find_elements(By.CSS_SELECTOR, "#bars .row")
    shown = {row.get_attribute("data-label"): float(row.get_attribute("data-probability")) for row in rows}
    widths = {row.get_attribute("data-label"): row.find_element(By.CLASS_NAME, "fill").get_attribute("style")
              for row in rows}
    percents = {row.get_attribute("data-label"): row.find_element(By.CLASS_NAME, "value").text for row in rows}
    header = {name: driver.find_element(By.ID, name).text for name in ("run", "head", "text-model", "image-model")}
    [expected] = model.predict([tiny.images[0]], [tiny.texts[0]])
    assert [row for row in shown] == list(LABELS) and shown == expected["probabilities"]
    assert label == expected["label"]
    for name, p in expected["probabilities"].items():  # the browser rewrites "34.10%" as "34.1%"
        assert float(re.fullmatch(r"width: ([0-9.]+)%;", widths[name]).group(1)) == pytest.approx(100 * p, abs=0.006)
        assert percents[name].endswith("%") and float(percents[name][:-1]) == pytest.approx(100 * p, abs=0.051)
    about = model.describe()
    assert header == {"run": about["run"], "head": "self_attn", "text-model": about["text_model"],
                      "image-model": about["image_model"]} and about["text_model"].endswith("/bert")


def test_the_page_shows_why_a_file_is_refused(served, driver, tmp_path):
    from selenium.webdriver.common.by import By

    url, _, _ = served
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are notes, not pixels")
    assert _submit(driver, url, not_an_image, "hello") == "refused"
    assert "not an image" in driver.find_element(By.ID, "error").text
    assert not driver.find_element(By.ID, "result").is_displayed()


def test_the_page_draws_what_each_modality_says_alone(served, driver):
    from selenium.webdriver.common.by import By

    url, model, tiny = served
    assert _submit(driver, url, tiny.images[1], tiny.texts[1]) == "answered"
    [expected] = model.predict([tiny.images[1]], [tiny.texts[1]], explain=True)
    for key in ("text_only", "image_only"):
        row = driver.find_element(By.CSS_SELECTOR, f'#modalities .modality[data-modality="{key}"]')
        parts = row.find_elements(By.CSS_SELECTOR, ".stack span")
        shown = {part.get_attribute("data-label"): float(part.get_attribute("data-probability")) for part in parts}
        assert shown == expected["explanation"][key]
    assert not driver.find_element(By.ID, "attention").is_displayed()  # a pooled run: no token attention
    assert driver.find_element(By.ID, "calibration").text.startswith("probabilities calibrated on validation")


def _picture(path: Path) -> Path:
    """A 360 x 240 picture with shapes, wider than tall: the encoder sees its centre (the page crops to it)."""
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (360, 240), (40, 90, 160))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((0, 150, 360, 240), fill=(70, 150, 60))
    draw.ellipse((200, 30, 290, 120), fill=(250, 210, 40))
    draw.rectangle((60, 90, 130, 190), fill=(200, 60, 50))
    picture.save(path)
    return path


def test_the_page_overlays_the_patch_heatmap_and_shades_the_words(served_tokens, driver, tmp_path):
    from selenium.webdriver.common.by import By

    url, model, tiny = served_tokens
    picture, text = _picture(tmp_path / "post.png"), "not bad at all, what a day"
    assert _submit(driver, url, picture, text) == "answered"
    [expected] = model.predict([picture], [text], explain=True)
    explanation = expected["explanation"]
    assert driver.find_element(By.ID, "attention").is_displayed()
    heat = driver.find_element(By.ID, "overlay-heat")
    grid = explanation["image_attention"]
    assert json.loads(heat.get_attribute("data-weights")) == grid
    assert (int(heat.get_attribute("data-rows")), int(heat.get_attribute("data-columns"))) == (2, 2)
    # Each patch's cell is painted with an opacity in proportion to its weight (the largest: 0.7).
    alphas = driver.execute_script("""
        const canvas = arguments[0], rows = arguments[1], columns = arguments[2];
        const context = canvas.getContext("2d"), found = [];
        for (let r = 0; r < rows; r++) for (let c = 0; c < columns; c++) {
          const x = Math.floor((c + 0.5) * canvas.width / columns), y = Math.floor((r + 0.5) * canvas.height / rows);
          found.push(context.getImageData(x, y, 1, 1).data[3]);
        }
        return [found, canvas.width, canvas.height];""", heat, 2, 2)
    largest = max(max(row) for row in grid)
    for alpha, weight in zip(alphas[0], [w for row in grid for w in row]):
        assert alpha == pytest.approx(255 * 0.7 * weight / largest, abs=2)
    view = explanation["image_view"]  # 360 x 240 resized to 48 x 32, centre crop 28 x 28
    assert alphas[1] / alphas[2] == pytest.approx(view["width"] * 360 / (view["height"] * 240), rel=0.02)
    spans = driver.find_elements(By.CSS_SELECTOR, "#words span")
    assert [span.get_attribute("data-token") for span in spans] == [e["token"] for e in explanation["text_attention"]]
    biggest = max(entry["weight"] for entry in explanation["text_attention"])
    for span, entry in zip(spans, explanation["text_attention"]):
        assert float(span.get_attribute("data-weight")) == entry["weight"]
        shade = re.fullmatch(r"rgba\(245, 120, 10, ([0-9.]+)\)", span.value_of_css_property("background-color"))
        assert shade and float(shade.group(1)) == pytest.approx(0.7 * entry["weight"] / biggest, abs=0.01)
    driver.set_window_size(1000, 1500)
    shot = Path(os.environ.get("FUSION_SCREENSHOTS", tmp_path)) / "serve_explain.png"
    assert driver.save_screenshot(str(shot)) and shot.read_bytes()[:4] == b"\x89PNG"
    driver.set_window_size(1000, 900)
