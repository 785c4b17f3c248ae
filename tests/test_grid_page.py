"""grid.html, the interactive grid page: its files, and the page itself driven in headless Chromium (issue 24).

One sweep (2 LoRAs x 2 strengths x 2 seeds + baseline rows, 96x64, scored, tracked) serves the
module; the browser tests open its grid.html from file:// and save screenshots under the workspace's outputs.
A running sweep's page (grid-live.js) is tested in pieces: the page written for half the results follows the
live file written for all of them, and a real run stopped midway (SIGSTOP, then kill -9) has left both files.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
from pathlib import Path

import pandas as pd
import pytest
from helpers import Workspace, mlflow_runs, start_run, two_lora_sweep, wait_for_results
from PIL import Image

pytestmark = pytest.mark.slow

GRID_SWEEP = two_lora_sweep("gridpage", ["clip_score", "aesthetic"], "the grid page's sweep", width=96)
LIVE_SWEEP = {  # 8 small images, one at a time: stopped after the first
    "name": "gridlive",
    "base": {"prompt": "a red circle on a blue background", "width": 64, "height": 64, "num_inference_steps": 4},
    "grid": {"lora_model": ["sunset"], "seed": {"start": 0, "count": 8}},
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, assets_dir):
    """(workspace, folder, plan, results) of one scored, tracked run of GRID_SWEEP."""
    ws = Workspace(tmp_path_factory.mktemp("gridpage"), assets_dir)
    result = ws.cli("run", f"sweep={ws.sweep('gridpage', GRID_SWEEP)}")
    assert result.code == 0, result.err
    folder = ws.outputs / "gridpage"
    return ws, folder, pd.read_parquet(folder / "plan.parquet"), pd.read_parquet(folder / "results.parquet")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from browser import browser

    with browser(tmp_path_factory.mktemp("profile"), width=1280, height=900) as driver:
        yield driver


def index_of(folder: Path) -> dict:
    text = (folder / "grid.html").read_text()
    return json.loads(re.search(r"<script type='application/json' id='grid-index'>(.*?)</script>", text, re.S).group(1))


def live_index_of(folder: Path) -> dict:
    """The index in grid-live.js (`window.gridLive && gridLive({...});`)."""
    text = (folder / "grid-live.js").read_text()
    return json.loads(re.fullmatch(r"window\.gridLive && gridLive\((.*)\);\s*", text, re.S).group(1))


def open_grid(page, folder: Path, fragment: str = "") -> None:
    """A fresh load of grid.html (a new fragment alone would not reload it), waited for until it has drawn."""
    from selenium.webdriver.support.ui import WebDriverWait

    page.get("about:blank")
    page.get((folder / "grid.html").as_uri() + fragment)
    WebDriverWait(page, 20).until(lambda d: d.execute_script("return document.body.dataset.ready === 'yes'"))


def wait(page, script: str, timeout: float = 10):
    """Wait until the page's `script` (an expression) is truthy; returns its value."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(page, timeout).until(lambda d: d.execute_script(f"return {script}"))


BUILT_IN_VIEW = """
const view = document.getElementById('scroller').getBoundingClientRect();
const near = e => { const r = e.getBoundingClientRect();
  return r.bottom > view.top && r.top < view.bottom && r.right > view.left && r.left < view.right; };
const all = selector => Array.from(document.querySelectorAll(selector)).filter(near);
return all('.grow').every(r => r.dataset.filled) && all('.gcell:not(.absent)').every(c => c.dataset.complete)
  && all('.slot img').every(i => i.complete && i.naturalWidth > 0);
"""


def thumbnails_loaded(page) -> None:
    """The rows and cells in view are built (a few images a frame) and their thumbnails have loaded (those out of
    view come as they come near)."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(page, 10).until(lambda d: d.execute_script(BUILT_IN_VIEW))


def shot(page, ws: Workspace, name: str) -> Path:
    path = ws.outputs / "screenshots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.save_screenshot(str(path))
    return path


def texts(page, selector: str) -> list[str]:
    return page.execute_script(f"return Array.from(document.querySelectorAll({selector!r})).map(e => e.textContent)")


def shown_ids(page) -> set[str]:
    return set(page.execute_script("return Array.from(document.querySelectorAll('.slot[data-id]')).map(e => e.dataset.id)"))


def assert_shown(page, ids) -> None:
    """The page shows these images and no others, once it has filled the cells in view (an IntersectionObserver does)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    with contextlib.suppress(TimeoutException):
        WebDriverWait(page, 5).until(lambda d: shown_ids(d) == set(ids))
    assert shown_ids(page) == set(ids)


def key(page, keys: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(page).send_keys(keys).perform()


def click_image(page, image_id: str, shift: bool = False) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    slot = page.find_element(By.CSS_SELECTOR, f".slot[data-id='{image_id}']")
    if shift:
        ActionChains(page).key_down(Keys.SHIFT).click(slot).key_up(Keys.SHIFT).perform()
    else:
        slot.click()


def image_of(plan: pd.DataFrame, **fields) -> str:
    """The id of the one plan row with these field values."""
    rows = plan
    for name, value in fields.items():
        rows = rows[rows[name] == value]
    assert len(rows) == 1, fields
    return rows["id"].iloc[0]


# ------------------------------------------------------------ files


def test_the_page_is_offline_its_index_columnar_and_thumbnails_small(sweep):
    ws, folder, plan, results = sweep
    html = (folder / "grid.html").read_text()
    assert "grid.html" in (folder / "report.html").read_text()
    assert not re.search(r"<script[^>]+src=|<link|@import|url\(\s*['\"]?https?:", html), "everything the page needs is inline"
    index = index_of(folder)
    assert index["n"] == len(plan) == len(index["ids"]) == 10 and set(index["ids"]) == set(plan["id"])
    axes = {a["name"]: a for a in index["axes"]}
    assert {"lora_model", "lora_strength", "seed", "blend"} <= set(axes)
    position = {i: k for k, i in enumerate(index["ids"])}
    for name in ("seed", "blend"):
        codes = axes[name]["codes"]
        assert len(codes) == len(plan) and all(isinstance(c, int) and 0 <= c < len(axes[name]["values"]) for c in codes)
        for row in plan.to_dict("records"):  # the codes decode to the plan's values
            assert axes[name]["values"][codes[position[row["id"]]]] == str(row[name])
    assert axes["seed"]["values"] == ["0", "1"] and axes["lora_strength"]["values"][0] == "-", "numbers ascending, no LoRA first"
    assert set(index["scores"]) >= {"clip_score", "aesthetic"}
    assert "clip_score_mean" in index["cell"]["columns"] and len(index["cell"]["row"]) == len(plan)
    for image_id in results.loc[results["status"] == "ok", "id"]:
        with Image.open(folder / "thumbs" / f"{image_id}.webp") as thumb:
            assert max(thumb.size) <= 128 and abs(thumb.width / thumb.height - 96 / 64) < 0.03, thumb.size


def test_a_finished_run_leaves_its_live_index_finished(sweep):
    _, folder, plan, _ = sweep
    live, page = live_index_of(folder), index_of(folder)
    assert live["running"] is False and page["running"] is False, "a page open during the run stops polling"
    assert live["ids"] == page["ids"] and live["status"] == page["status"] == [0] * len(plan)
    assert live["scores"] == page["scores"] and "clip_score" in live["scores"], "the final index: scores and ranking too"


def test_a_second_report_keeps_thumbnails_and_a_running_sweep_shows_pending_cells(sweep, page):
    ws, folder, plan, _ = sweep
    copy = ws.outputs / "gridpage-running"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("results.parquet", "mlflow*"))
    lines = (copy / "results.jsonl").read_text().splitlines()
    (copy / "results.jsonl").write_text("\n".join(lines[:6]) + "\n")  # as if 4 images were still to come
    (copy / "scores.jsonl").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (copy / "thumbs").glob("*.webp")}
    gone = sorted(kept)[0]
    (copy / "thumbs" / gone).unlink()
    before = (copy / "grid.html").stat().st_mtime_ns
    report = ws.cli("report", str(copy), "tracking=none")
    assert report.code == 0, report.err
    assert (copy / "grid.html").stat().st_mtime_ns != before, "the page is written again"
    assert (copy / "thumbs" / gone).exists(), "a missing thumbnail is made"
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "thumbs").glob("*.webp") if p.name != gone} == {
        k: v for k, v in kept.items() if k != gone
    }, "existing thumbnails are not made again"
    open_grid(page, copy)
    thumbnails_loaded(page)
    pending = page.execute_script("return document.querySelectorAll('.slot.pending').length")
    assert pending == len(plan) - 6 and page.execute_script("return document.querySelectorAll('.slot.ok img').length") == 6
    assert f"{len(plan) - 6} pending" in page.find_element("id", "stats").text
    shot(page, ws, "grid-running")


# ------------------------------------------------------------ the page in Chromium


def test_axes_are_chosen_values_hidden_and_the_view_is_in_the_url(sweep, page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    ws, folder, plan, _ = sweep
    open_grid(page, folder)
    thumbnails_loaded(page)
    assert texts(page, ".xl") == ["-", "0.5", "1"] and texts(page, ".yl") == ["no LoRA", "sunset", "star"]
    assert_shown(page, plan["id"])
    shot(page, ws, "grid-default")
    Select(page.find_element(By.ID, "ax-x")).select_by_value("seed")
    Select(page.find_element(By.ID, "ax-y")).select_by_value("blend")
    rows = texts(page, ".yl")
    assert texts(page, ".xl") == ["0", "1"] and sorted(rows) == sorted(set(plan["blend"])) and rows[0] == "no LoRA"
    page.find_element(By.CSS_SELECTOR, ".chip[data-axis='lora_model'][data-value='star']").click()
    assert_shown(page, plan.loc[plan["lora_model"] != "star", "id"])
    page.find_element(By.CSS_SELECTOR, ".togglerow[data-axis='lora_strength'] .nonebtn").click()
    assert_shown(page, [])
    assert page.find_elements(By.CSS_SELECTOR, "#grid .empty"), "it says why the grid is empty"
    page.find_element(By.CSS_SELECTOR, ".togglerow[data-axis='lora_strength'] .all").click()
    Select(page.find_element(By.ID, "ax-page")).select_by_value("lora_model")
    assert [o.text for o in Select(page.find_element(By.ID, "page-value")).options] == ["no LoRA", "sunset"], "pages of shown values"
    Select(page.find_element(By.ID, "page-value")).select_by_value("sunset")
    expected = plan[plan["lora_model"] == "sunset"]
    assert_shown(page, expected["id"])
    fragment = page.execute_script("return location.hash")
    open_grid(page, folder, fragment)  # a link reopens the same view
    assert_shown(page, expected["id"])
    assert page.find_element(By.ID, "page-value").get_attribute("value") == "sunset"
    chip = page.find_element(By.CSS_SELECTOR, ".chip[data-axis='lora_model'][data-value='star']")
    assert chip.get_attribute("aria-pressed") == "false"
    thumbnails_loaded(page)
    shot(page, ws, "grid-axes-chosen")


def test_cell_size_slider_and_fit_to_width_keep_the_aspect_ratio_and_labels_stick(sweep, page):
    from selenium.webdriver.common.by import By

    _, folder, _, _ = sweep
    open_grid(page, folder, "#size=200")
    thumbnails_loaded(page)
    width, height = page.execute_script("var r = document.querySelector('.slot img').getBoundingClientRect(); return [r.width, r.height]")
    assert width == pytest.approx(200, abs=1) and width / height == pytest.approx(96 / 64, rel=0.02)
    open_grid(page, folder, "#size=400")
    page.execute_script("document.getElementById('scroller').scrollTo(700, 300)")
    wait(page, "document.getElementById('scroller').scrollTop > 0 && document.getElementById('scroller').scrollLeft > 0")
    head, label, box = page.execute_script(
        "return [document.querySelector('.ghead').getBoundingClientRect().top, document.querySelector('.yl').getBoundingClientRect().left,"
        " document.getElementById('scroller').getBoundingClientRect()]"
    )
    assert head == pytest.approx(box["top"], abs=1) and label == pytest.approx(box["left"], abs=1), "axis labels stay in view"
    page.find_element(By.ID, "fit").click()
    wait(page, "document.querySelectorAll('.gcell').length > 0")  # the grid is drawn again, its cells a frame or more later
    thumbnails_loaded(page)
    rights, view = page.execute_script(
        "return [Array.from(document.querySelectorAll('.gcell')).map(c => c.getBoundingClientRect().right),"
        " document.getElementById('scroller').getBoundingClientRect().left + document.getElementById('scroller').clientWidth]"
    )
    assert rights and max(rights) <= view, "fit to width: every column in view"
    assert "fit=1" in page.execute_script("return location.hash")


def test_an_image_opens_full_size_with_its_parameters_and_keys_step_along_x_y_and_seeds(sweep, page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ws, folder, plan, results = sweep
    start = dict(lora_model="sunset", lora_strength="0.5", seed=0)
    first = image_of(plan, **start)
    open_grid(page, folder)
    thumbnails_loaded(page)
    click_image(page, first)
    viewer = page.find_element(By.ID, "viewer")
    wait(page, "document.getElementById('vimage').complete && document.getElementById('vimage').naturalWidth > 0")
    assert viewer.get_attribute("data-id") == first
    assert page.execute_script("return document.getElementById('vimage').naturalWidth") == 96, "the full PNG, not its thumbnail"
    text = viewer.text
    shown = dict(
        page.execute_script(
            "return Array.from(document.querySelectorAll('#vaxes tr')).map(r => [r.cells[0].textContent, r.cells[1].textContent])"
        )
    )
    assert {k: shown[k] for k in start} == {k: str(v) for k, v in start.items()}, "its parameters"
    scores = dict(
        page.execute_script(
            "return Array.from(document.querySelectorAll('#vscores tr')).map(r => [r.cells[0].textContent, r.cells[1].textContent])"
        )
    )
    assert float(scores["clip_score"]) == pytest.approx(results.set_index("id").loc[first, "clip_score"], rel=1e-3)
    assert first in text and "clip_score_mean" in scores, "its id, its scores and its ranking cell's"
    _, children = mlflow_runs(ws.outputs, "gridpage")
    run = children.set_index("tags.lora_sweep.id").loc[first]
    link = page.find_element(By.ID, "vmlflow").get_attribute("href")
    assert link == f"http://127.0.0.1:5000/#/experiments/{run['experiment_id']}/runs/{run['run_id']}"
    assert f"lora-sweep reproduce {first}" in text
    shot(page, ws, "grid-viewer")
    for keys, change in (
        (Keys.ARROW_RIGHT, {"lora_strength": "1"}),  # along x
        (Keys.ARROW_DOWN, {"lora_model": "star"}),  # along y
        ("s", {"seed": 1}),  # the next seed, same cell
        (Keys.ARROW_LEFT, {"lora_strength": "0.5"}),
    ):
        start |= change
        key(page, keys)
        wait(page, f"document.getElementById('viewer').dataset.id === {image_of(plan, **start)!r}")
    assert f"view={image_of(plan, **start)}" in page.execute_script("return location.hash")
    key(page, Keys.ESCAPE)
    wait(page, "document.getElementById('viewer').hidden")
    assert "view=" not in page.execute_script("return location.hash")


def test_arrow_keys_at_the_edge_of_a_page_go_on_to_the_next_page_and_back(sweep, page):
    from selenium.webdriver.common.keys import Keys

    _, folder, plan, _ = sweep
    open_grid(page, folder, "#x=lora_strength&y=lora_model&page=seed")
    thumbnails_loaded(page)
    steps = (  # (key, the image it shows, the page it is on)
        (Keys.ARROW_RIGHT, dict(lora_model="sunset", lora_strength="0.5", seed=1), "1"),  # page 2's first x in this row ("-": none)
        (Keys.ARROW_LEFT, dict(lora_model="sunset", lora_strength="1", seed=0), "0"),  # page 1's last x
        (Keys.ARROW_DOWN, dict(lora_model="star", lora_strength="1", seed=0), "0"),  # within the page
        (Keys.ARROW_DOWN, dict(lora_model="sunset", lora_strength="1", seed=1), "1"),  # page 2's first y in this column
        (Keys.ARROW_UP, dict(lora_model="star", lora_strength="1", seed=0), "0"),  # page 1's last y
    )
    click_image(page, image_of(plan, lora_model="sunset", lora_strength="1", seed=0))
    wait(page, "!document.getElementById('viewer').hidden")
    for keys, where, page_value in steps:
        key(page, keys)
        image = image_of(plan, **where)
        wait(page, f"document.getElementById('viewer').dataset.id === {image!r}")
        assert page.find_element("id", "page-value").get_attribute("value") == page_value, (where, "the page selector follows")
        assert f"pv={page_value}" in page.execute_script("return location.hash")
    assert texts(page, ".xl") == ["-", "0.5", "1"], "the grid behind the viewer is the page's"


def test_an_open_page_follows_a_running_sweep_without_a_reload_and_stops_when_it_ends(sweep, page):
    from runner.report.grid_page import write_grid_page

    ws, folder, plan, results = sweep
    copy = ws.outputs / "gridpage-live"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("mlflow*", "grid-live.js"))
    done, coming = results["id"].iloc[:5].tolist(), results["id"].iloc[5:].tolist()
    for image_id in coming:  # not made yet: no thumbnail either
        (copy / "thumbs" / f"{image_id}.webp").unlink()
    axes = {"x": "lora_strength", "y": "lora_model"}
    half = results[results["id"].isin(done)][["id", "status", "file", "seed"]]
    write_grid_page(copy, plan, half, None, [], name="gridpage", defaults=axes, runs={}, running=True)
    assert live_index_of(copy)["running"] is True and index_of(copy)["running"] is True
    hidden = plan.loc[plan["lora_strength"] == "0.5", "id"].tolist()
    viewed = next(i for i in coming if i not in hidden)
    open_grid(page, copy, f"#size=512&hide=lora_strength%3D0.5&view={viewed}")
    assert page.execute_script("return document.body.dataset.live") == "polling"
    assert "not generated yet" in page.find_element("id", "vmissing").text
    page.execute_script("window.__marker = 'not reloaded'; document.getElementById('scroller').scrollTo(120, 80)")
    thumbnails_loaded(page)
    kept = page.execute_script("const slot = document.querySelector('.slot.ok'); slot.__kept = true; return slot.dataset.id")
    scroll = page.execute_script("const s = document.getElementById('scroller'); return [s.scrollLeft, s.scrollTop]")
    assert scroll[0] > 0 and scroll[1] > 0, "the grid scrolls at this size"

    ranking = pd.read_csv(folder / "ranking.csv")
    write_grid_page(copy, plan, results, ranking, ["clip_score", "aesthetic"], name="gridpage", defaults=axes, runs={}, running=False)
    assert all((copy / "thumbs" / f"{image_id}.webp").exists() for image_id in coming), "the new images' thumbnails"
    wait(page, "document.body.dataset.live === 'finished'", timeout=20)
    assert page.execute_script("return window.__marker") == "not reloaded"
    kept_node = f"document.querySelector('.slot[data-id=\"{kept}\"]').__kept"
    assert page.execute_script(f"return {kept_node}") is True, "an image done before is not drawn again"
    assert_shown(page, [i for i in plan["id"] if i not in hidden])
    assert page.execute_script("return document.querySelectorAll('.slot.pending').length") == 0
    thumbnails_loaded(page)
    sources = page.execute_script("return Array.from(document.querySelectorAll('.slot img')).map(i => i.getAttribute('src'))")
    assert sources and all(src.startswith("thumbs/") for src in sources), "thumbnails, not the PNGs"
    assert page.execute_script("const s = document.getElementById('scroller'); return [s.scrollLeft, s.scrollTop]") == scroll
    assert page.find_element("css selector", ".chip[data-axis='lora_strength'][data-value='0.5']").get_attribute("aria-pressed") == "false"
    viewer = page.find_element("id", "viewer")
    assert viewer.is_displayed() and viewer.get_attribute("data-id") == viewed, "the viewer stays open, on its image"
    wait(page, "document.getElementById('vimage').complete && document.getElementById('vimage').naturalWidth === 96")
    assert "clip_score" in viewer.text, "with its scores now"
    stats = page.find_element("id", "stats").text
    assert "pending" not in stats and "running" not in stats, stats
    shot(page, ws, "grid-live-finished")


def test_a_running_page_whose_run_went_quiet_says_so_and_keeps_looking(sweep, page):
    """A run killed with kill -9 never writes that it ended; its page says how long nothing has come."""
    import time

    from runner.report.grid_page import write_grid_page, write_live

    ws, folder, plan, results = sweep
    copy = ws.outputs / "gridpage-quiet"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("mlflow*", "grid-live.js"))
    write_grid_page(copy, plan, results.iloc[:5], None, [], name="gridpage", runs={}, running=True)
    open_grid(page, copy)
    assert "running: updates itself" in page.find_element("id", "stats").text
    write_live(copy, live_index_of(copy) | {"written": round(time.time()) - 3600})  # the run's last word, an hour ago
    wait(page, "document.body.dataset.quiet === 'yes'", timeout=20)
    stats = page.find_element("id", "stats").text
    assert "running? nothing new for 60 min (if the run has stopped, `lora-sweep report` on this folder" in stats, stats
    assert page.execute_script("return document.body.dataset.live") == "polling", "it keeps looking: the run may go on"


def test_a_page_whose_plan_grows_loads_the_new_page_once_keeping_its_view(sweep, page):
    """A search adds trials' rows as it goes: the open page reloads for the new grid.html, its view and scroll kept."""
    from runner.report.grid_page import write_grid_page

    ws, folder, plan, results = sweep
    copy = ws.outputs / "gridpage-grows"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("mlflow*", "grid-live.js"))
    first = plan[plan["lora_model"] != "star"]
    write_grid_page(copy, first, results, None, [], name="gridpage", runs={}, running=True)
    open_grid(page, copy, "#x=seed&y=blend&size=512")
    page.execute_script("window.__marker = 'first page'; document.getElementById('scroller').scrollTo(0, 150)")
    write_grid_page(copy, plan, results, None, [], name="gridpage", runs={}, running=False)
    wait(page, "window.__marker === undefined && document.body.dataset.ready === 'yes'", timeout=20)
    assert page.find_element("id", "stats").text.startswith(f"{len(plan)} images"), "the new plan's page"
    assert page.execute_script("return [location.hash.includes('x=seed'), document.getElementById('scroller').scrollTop]") == [True, 150]
    assert page.execute_script("return document.body.dataset.live") == "off", "a finished sweep's page does not poll"


def test_a_run_writes_its_page_first_and_report_works_while_it_runs(workspace):
    ws = workspace
    folder = ws.outputs / "gridlive"
    proc = start_run(ws, f"sweep={ws.sweep('gridlive', LIVE_SWEEP)}", "tracking=none", "engine.batch_size=1")
    try:
        wait_for_results(folder, 1, proc)
        proc.send_signal(signal.SIGSTOP)  # the run, midway: it holds the folder's lock and makes no more images
        page, live = index_of(folder), live_index_of(folder)
        assert page["n"] == 8 and page["running"] is True and live["running"] is True
        assert 2 in live["status"], "images still to come are pending"
        report = ws.cli("report", str(folder), "tracking=none")
        assert report.code == 0, report.err
        page = index_of(folder)
        assert page["running"] is True and live_index_of(folder)["running"] is True, "the report's page knows the run goes on"
        assert 0 in page["status"] and 2 in page["status"]
        proc.send_signal(signal.SIGKILL)  # interrupted for good: the page it wrote stays
        proc.communicate(timeout=30)
        assert (folder / "grid.html").exists() and index_of(folder)["n"] == 8
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)


def test_two_cells_are_compared_side_by_side_and_in_an_overlay_at_the_same_seed(sweep, page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    ws, folder, plan, _ = sweep
    same = dict(seed=1)
    a = image_of(plan, lora_model="sunset", lora_strength="0.5", **same)
    other_seed = image_of(plan, lora_model="star", lora_strength="1", seed=0)
    open_grid(page, folder)
    thumbnails_loaded(page)
    page.find_element(By.ID, "compare-btn").click()
    click_image(page, a)
    click_image(page, other_seed)
    compare = page.find_element(By.ID, "compare")
    wait(page, "!document.getElementById('compare').hidden")
    b = image_of(plan, lora_model="star", lora_strength="1", **same)
    assert (compare.get_attribute("data-a"), compare.get_attribute("data-b")) == (a, b), "the second cell's image at the same seed"
    wait(page, "Array.from(document.querySelectorAll('#cside img')).every(i => i.complete && i.naturalWidth === 96)")
    assert page.execute_script("return document.querySelectorAll('#cside img').length") == 2
    shot(page, ws, "grid-compare-side")
    page.find_element(By.ID, "cv-overlay").click()
    assert page.find_element(By.ID, "coverlay").is_displayed() and not page.find_element(By.ID, "cside").is_displayed()
    clip = "return getComputedStyle(document.querySelector('#coverlay .cimg.B')).clipPath"
    assert "50%" in page.execute_script(clip)
    key(page, "f")  # flip: one image whole
    assert page.execute_script(clip) in ("inset(0px 0px 0px 100%)", "inset(0px 0px 0px 0%)", "inset(0px)")
    wait(page, "Array.from(document.querySelectorAll('#coverlay img')).every(i => i.complete && i.naturalWidth > 0)")
    key(page, "f")
    shot(page, ws, "grid-compare-overlay")
    key(page, "s")  # both to the next seed
    a_next = image_of(plan, lora_model="sunset", lora_strength="0.5", seed=0)
    wait(page, f"document.getElementById('compare').dataset.a === {a_next!r}")
    assert compare.get_attribute("data-b") == other_seed
    key(page, Keys.ESCAPE)
    wait(page, "document.getElementById('compare').hidden")
    click_image(page, a, shift=True)  # shift-click picks the first too
    click_image(page, b)
    wait(page, f"document.getElementById('compare').dataset.b === {b!r}")


def test_scores_colour_the_grid_per_image_and_per_ranking_cell(sweep, page):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    ws, folder, plan, results = sweep
    open_grid(page, folder)
    Select(page.find_element(By.ID, "color")).select_by_value("image:clip_score")
    assert_shown(page, plan["id"])
    colours = page.execute_script(
        "return Object.fromEntries(Array.from(document.querySelectorAll('.slot[data-id]'))"
        ".map(s => [s.dataset.id, getComputedStyle(s.querySelector('.band')).backgroundColor]))"
    )
    scores = results.set_index("id")["clip_score"]
    assert colours[scores.idxmax()] == "rgb(253, 231, 37)" and colours[scores.idxmin()] == "rgb(68, 1, 84)"
    ranking = pd.read_csv(folder / "ranking.csv")
    Select(page.find_element(By.ID, "color")).select_by_value("cell:clip_score_mean")
    Select(page.find_element(By.ID, "cmode")).select_by_value("heat")
    assert_shown(page, plan["id"])
    heat = page.execute_script(
        "return Object.fromEntries(Array.from(document.querySelectorAll('.slot[data-id]'))"
        ".map(s => [s.dataset.id, [getComputedStyle(s.querySelector('.heat')).backgroundColor, s.querySelector('.heat').textContent]]))"
    )
    for row in ranking.to_dict("records"):
        members = [heat[i] for i in row["ids"].split()]
        assert len({m[0] for m in members}) == 1, "one colour per ranking cell"
        assert float(members[0][1]) == pytest.approx(row["clip_score_mean"], rel=1e-3)
    best = ranking.sort_values("clip_score_mean").iloc[-1]["ids"].split()[0]
    assert heat[best][0] == "rgb(253, 231, 37)"
    assert "color=cell%3Aclip_score_mean" in page.execute_script("return location.hash")
    shot(page, ws, "grid-heatmap")
