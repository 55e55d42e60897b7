"""``bnlab explain`` (issue 15): the page is self-contained, and in a real headless browser
(Debian's chromium, driven by Selenium) it loads with no console error and no network
request, shows bnlab's numbers, and its controls change what they should."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bnlab import cli, explain
from bnlab import functional as F

ROOT = Path(__file__).resolve().parents[1]
FIG1 = ROOT / "docs" / "results" / "fig1"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("explain")
    assert cli.main(["explain", "--out", str(out), "--run", str(FIG1)]) == 0
    return out / "explain.html"


def test_the_page_is_one_small_self_contained_file(page):
    files = list(page.parent.iterdir())
    assert files == [page] and page.stat().st_size < 8 * 2**20
    html = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", html)  # nothing fetched
    assert "default-src 'none'" in html  # and the page forbids fetching anything
    assert "Chart.js v4" in html and "MIT" in html  # the vendored library, with its license


def test_bad_input_gets_a_clear_error(tmp_path, capsys):
    assert cli.main(["explain", "--out", str(tmp_path), "--run", str(tmp_path / "nope")]) == 2
    assert "run folder" in capsys.readouterr().err
    empty = tmp_path / "run"
    empty.mkdir()
    assert cli.main(["explain", "--out", str(tmp_path), "--run", str(empty)]) == 2
    assert "has no curves" in capsys.readouterr().err
    (empty / "results.json").write_text(json.dumps({"runs": {"a": {"diverged": False}}}))
    assert cli.main(["explain", "--out", str(tmp_path), "--run", str(empty)]) == 2
    assert "has no curves" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli.main(["explain", "--out", str(blocker / "sub")]) == 2
    assert "cannot write the page" in capsys.readouterr().err


# --- in the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser(page, tmp_path_factory):
    from bnlab.explain import browser as chromium

    if not chromium.available():
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs "
                    "them: apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium")
    driver = chromium.chromium(tmp_path_factory.mktemp("chromium"))
    driver.get_log("performance")  # what the browser did before our page: not counted
    driver.get(page.as_uri())
    yield driver
    driver.quit()


def number(driver, id_):
    return float(driver.find_element("id", id_).get_attribute("data-value"))


def stats(driver, step):
    return {k: number(driver, f"step{step}-{k}") for k in ("mean", "var", "min", "max")}


def test_it_loads_with_no_console_error_and_no_network_request(browser, page):
    assert browser.execute_script("return document.body.dataset.ready") == "true"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    events = [json.loads(e["message"])["message"] for e in browser.get_log("performance")]
    requests = [e["params"] for e in events if e["method"] == "Network.requestWillBeSent"]
    ours = {r["request"]["url"] for r in requests if r.get("documentURL") == page.as_uri()}
    assert ours == {page.as_uri()}  # the page itself, and nothing it asked for
    # nor anything on the network, from anyone (the browser's own pages are chrome://)
    assert not [r["request"]["url"] for r in requests
                if re.match(r"(https?|wss?|ftp):", r["request"]["url"])]


def default_batch(size=explain.DEFAULT_SIZE):
    """A batch, recomputed here as the page's docstring says: the first ``size`` digits of a
    seed-0 shuffle of the embedded training digits, through the seed CNN's first
    convolution."""
    from bnlab import models
    from bnlab.data import datasets

    images = datasets.load("mnist-5k").train[0]
    order = np.random.default_rng(0).permutation(len(images))
    return models.seed_cnn(seed=0)[0](images[order[:size]])


def test_the_numbers_on_the_page_are_bnlabs(browser):
    x = default_batch()
    C = x.shape[1]
    y, cache = F.batch_norm_forward(x, np.ones(C, np.float32), np.zeros(C, np.float32),
                                    eps=1e-5, axis=1)
    c = explain.DEFAULT_CHANNEL
    x_c = x[:, c].astype(np.float64)
    steps = {1: x_c, 2: x_c - cache.mean[c], 3: y[:, c], 4: y[:, c]}  # gamma 1, beta 0
    for k, v in steps.items():
        shown = stats(browser, k)
        scale = float(np.abs(v).max())
        for name, want in (("mean", v.mean()), ("var", v.var()), ("min", v.min()),
                           ("max", v.max())):
            tol = 1e-5 * scale * (scale if name == "var" else 1)
            assert abs(shown[name] - want) <= tol, (k, name, shown[name], want)


def histogram_mean(browser, chart):
    return browser.execute_script(f"""
        const d = Chart.getChart("{chart}").data, xs = d.labels.map(Number), n = d.datasets[0].data;
        let s = 0, m = 0;
        xs.forEach((x, i) => {{ s += n[i]; m += n[i] * x; }});
        return m / s;""")


def test_the_gamma_slider_moves_the_last_histogram(browser):
    from selenium.webdriver.common.keys import Keys

    browser.find_element("css selector", 'input[name="mode"][value="eval"]').click()
    before3, before4 = stats(browser, 3), stats(browser, 4)
    assert abs(before4["mean"] - before3["mean"]) < 1e-12  # gamma 1, beta 0
    hist_before = histogram_mean(browser, "chart4")
    gamma = browser.find_element("id", "gamma")
    gamma.send_keys(*[Keys.ARROW_RIGHT] * 5)  # the keyboard: 1.0 -> 1.5
    assert browser.find_element("id", "gamma-out").text == "1.5"
    after3, after4 = stats(browser, 3), stats(browser, 4)
    assert after3 == before3
    # in evaluation the normalized values do not have mean 0: y's mean is gamma * x_hat's
    assert after4["mean"] == pytest.approx(1.5 * after3["mean"], rel=1e-9)
    assert after4["var"] == pytest.approx(1.5 ** 2 * after3["var"], rel=1e-9)
    assert histogram_mean(browser, "chart4") == pytest.approx(1.5 * hist_before, rel=0.02)
    gamma.send_keys(*[Keys.ARROW_LEFT] * 5)
    browser.find_element("css selector", 'input[name="mode"][value="train"]').click()


def test_the_train_eval_switch_changes_the_output(browser):
    train = stats(browser, 4)
    assert abs(train["mean"]) < 1e-6 and train["var"] == pytest.approx(1, abs=1e-3)
    diff = number(browser, "diff-max")
    browser.find_element("css selector", 'input[name="mode"][value="eval"]').click()
    evaluation = stats(browser, 4)
    assert evaluation != train and diff > 0
    # the page's own difference: eval minus train output at the batch's extremes
    assert max(abs(evaluation["min"] - train["min"]), abs(evaluation["max"] - train["max"])) \
        == pytest.approx(diff, rel=1e-9)
    browser.find_element("css selector", 'input[name="mode"][value="train"]').click()


def test_the_batch_size_and_channel_choices_update_the_page(browser):
    from selenium.webdriver.support.select import Select

    before = stats(browser, 1)
    Select(browser.find_element("id", "batch")).select_by_value("2")
    small = stats(browser, 1)
    assert small != before and len(browser.find_elements("css selector", "#samples canvas")) == 2
    Select(browser.find_element("id", "channel")).select_by_value("3")
    assert stats(browser, 1) != small
    # the noise chart follows the channel: batch means by size, as bnlab computed them
    means = browser.execute_script(
        "return Chart.getChart('chart-noise').data.datasets[0].data.map(p => p.y)")
    x = default_batch(max(explain.SIZES))
    ones, zeros = np.ones(x.shape[1], np.float32), np.zeros(x.shape[1], np.float32)
    want = [F.batch_norm_forward(x[:b], ones, zeros, axis=1)[1].mean[3] for b in explain.SIZES]
    np.testing.assert_allclose(means, want, rtol=1e-12)
    Select(browser.find_element("id", "channel")).select_by_value("0")
    Select(browser.find_element("id", "batch")).select_by_value(str(explain.DEFAULT_SIZE))
    assert stats(browser, 1) == before


def test_run_curves_and_the_network_are_drawn(browser):
    datasets = browser.execute_script(
        "return ['chart-loss', 'chart-acc', 'chart-pct'].map(id => "
        "Chart.getChart(id).data.datasets.length)")
    assert datasets == [2, 2, 6]  # bn and plain; 3 percentiles each
    layers = browser.find_elements("css selector", "#network li")
    assert [li.text.split("\n")[0] for li in layers if "bn" in li.get_attribute("class")] == \
        ["BatchNorm2d", "BatchNorm2d"]


def test_a_screenshot_is_not_blank_and_the_page_fits_a_phone(browser, tmp_path):
    from PIL import Image

    path = tmp_path / "explain.png"
    assert browser.save_screenshot(str(path))
    pixels = np.asarray(Image.open(path).convert("L"), np.float64)
    assert pixels.shape == (800, 1280) or pixels.shape[1] == 1280
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50
    browser.set_window_size(390, 844)
    try:
        width, inner = browser.execute_script(
            "return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width <= inner  # no sideways scrolling at phone width
    finally:
        browser.set_window_size(1280, 800)
