"""`lora-sweep compare`: the voting page driven in headless Chromium, its HTTP routes with plain httpx, votes.jsonl read
back, and the pair choice on its own. One real sweep on the tiny model; each test that votes works on its own copy."""

from __future__ import annotations

import json
import random
import shutil
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pandas as pd
import pytest
from browser import browser
from helpers import Workspace, run_cli, start_compare, two_lora_sweep

from runner.compare.pairs import Candidate, candidate_pairs, choose_pair, pair_key
from runner.report.human import human_ranking, vote_cells
from runner.store import SweepStore

pytestmark = pytest.mark.slow

VOTED_SWEEP = two_lora_sweep("voted", [])  # 10 images, no scorers: the votes are the scores here
PAIRS = 20  # per seed: 5 cells (no LoRA, sunset 0.5, sunset 1, star 0.5, star 1), 10 pairs of them


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, assets_dir) -> Path:
    ws = Workspace(tmp_path_factory.mktemp("compare"), assets_dir)
    ws.run(f"sweep={ws.sweep('voted', VOTED_SWEEP)}", "tracking=none").assert_all_ok()
    return ws.outputs / "voted"


def copy_of(sweep: Path, where: Path) -> Path:
    """The sweep folder copied (ten small PNGs): a test's votes are its own."""
    return Path(shutil.copytree(sweep, where / "voted"))


@pytest.fixture(scope="module")
def shared(sweep, tmp_path_factory):
    """One server for the tests that do not kill it (each votes under its own voter name)."""
    server = start_compare(copy_of(sweep, tmp_path_factory.mktemp("shared")))
    yield server
    assert server.stop() == 0, server.log.read_text()


def vote_lines(folder: Path) -> list[dict]:
    path = folder / "votes.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def strengths(folder: Path) -> dict[str, float]:
    """Image id -> LoRA strength (0 for the baseline): what the scripted voter prefers less of."""
    plan = pd.read_parquet(folder / "plan.parquet")
    return {i: float(s) if s not in (None, "") else 0.0 for i, s in zip(plan["id"], plan["lora_strength"])}


def lower_strength_wins(left: str, right: str, strength: dict[str, float]) -> str:
    if strength[left] == strength[right]:
        return "tie"
    return "left" if strength[left] < strength[right] else "right"


# ---------------------------------------------------------------- the page in Chromium

KEY_OF = {"left": "\ue012", "right": "\ue014", "tie": "\ue015", "skip": " ", "undo": "u"}  # Selenium's arrow keys


class Page:
    """The voting page in one headless Chromium, read and pressed as a person would (plus the ids behind the images)."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.url = driver, url
        self.wait = WebDriverWait(driver, 30)

    def data(self, name: str) -> str | None:
        return self.driver.execute_script(f"return document.body.dataset.{name} || null")

    def open(self, voter: str | None = None) -> None:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        self.driver.get(self.url)
        self.wait_ready()
        if voter is not None:
            shown = int(self.data("shown"))
            field = self.driver.find_element(By.ID, "voter")
            field.clear()
            field.send_keys(voter, Keys.ENTER)
            self.wait_ready(shown)

    def wait_ready(self, shown_before: int = 0) -> None:
        self.wait.until(lambda _: self.data("state") == "ready" and int(self.data("shown") or 0) > shown_before)

    def pair(self) -> tuple[str, str]:
        ids = self.driver.execute_script(
            "return [document.getElementById('left-img').dataset.id, document.getElementById('right-img').dataset.id]"
        )
        return ids[0], ids[1]

    def press(self, action: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.find_element(By.TAG_NAME, "body").send_keys(KEY_OF[action])

    def act(self, action: str) -> None:
        """Press the key and wait until the server acknowledged it and the next pair is on screen."""
        acked, shown = int(self.data("acked") or 0), int(self.data("shown") or 0)
        self.press(action)
        self.wait.until(lambda _: int(self.data("acked") or 0) > acked)
        self.wait_ready(shown)

    def acked(self) -> list[str]:
        return self.driver.execute_script("return window.loraCompare.acked.slice()")

    def text(self, element_id: str) -> str:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.ID, element_id).text


def test_forty_votes_through_the_page_recover_the_preference_and_survive_sigkill(sweep, tmp_path):
    """A scripted voter (the lower strength wins) votes 40 pairs with the arrow keys; the server is SIGKILLed after 20 and
    restarted: every acknowledged vote is in votes.jsonl and Bradley-Terry puts no LoRA first, strength 1 last, apart."""
    folder = copy_of(sweep, tmp_path)
    strength, cells = strengths(folder), vote_cells(pd.read_parquet(folder / "plan.parquet"))
    plan = pd.read_parquet(folder / "plan.parquet").set_index("id")
    server = start_compare(folder)
    port = int(server.url.rsplit(":", 1)[1])
    shots = tmp_path / "screenshots"
    shots.mkdir()
    shown: list[tuple[str, str]] = []
    with browser(tmp_path / "profile") as driver:
        page = Page(driver, server.url + "/")
        page.open("ana")
        assert not any(label in driver.find_element("tag name", "body").text for label in set(cells)), "blends hidden before the vote"
        for number in range(40):
            left, right = page.pair()
            assert plan.loc[left, "seed"] == plan.loc[right, "seed"] and cells[left] != cells[right], "one seed, two cells"
            assert page.text("prompt") == f"“a red circle on a blue background” · seed {plan.loc[left, 'seed']}"
            shown.append(pair_key(left, right))
            choice = lower_strength_wins(left, right, strength)
            if number == 20:  # mid-voting: the server dies without a word; the key press finds nobody
                server.kill()
                page.press(choice)
                page.wait.until(lambda _: page.data("state") == "offline")
                assert "not saved" in page.text("status")
                server = start_compare(folder, port=port)
            page.act(choice)
            reveal = page.text("reveal")
            assert f"left was {cells[left]}" in reveal and f"right was {cells[right]}" in reveal, "the blends, once voted"
            if number == 3:
                driver.save_screenshot(str(shots / "compare-page.png"))
        acked = page.acked()
    assert server.stop() == 0, server.log.read_text()

    assert len(set(shown[:PAIRS])) == PAIRS, "every pair once before any twice"
    assert Counter(Counter(shown).values()) == {2: PAIRS}
    lines = vote_lines(folder)
    assert len(acked) == 40 and {line["vote"] for line in lines} == set(acked), "every acknowledged vote on disk, no other"
    assert all(line["voter"] == "ana" and line["kind"] == "vote" for line in lines)
    assert [line["choice"] for line in lines] == [lower_strength_wins(a["left"], a["right"], strength) for a in lines]

    ranking = human_ranking(pd.read_parquet(folder / "plan.parquet"), SweepStore(folder).read_votes()).set_index("cell")
    assert ranking.index[0] == "no LoRA" and set(ranking.index[-2:]) == {"sunset 1", "star 1"}, ranking
    assert set(ranking.index[1:3]) == {"sunset 0.5", "star 0.5"}, ranking
    for bottom in ("sunset 1", "star 1"):
        assert ranking.loc["no LoRA", "human_low"] > ranking.loc[bottom, "human_high"], ranking
    assert ranking["human_votes"].sum() == 2 * 40


def test_two_voters_at_once_are_both_kept_and_the_name_is_remembered(shared, tmp_path):
    names = ("bo", "cy")
    with browser(tmp_path / "bo") as first, browser(tmp_path / "cy") as second:
        pages = [Page(first, shared.url + "/"), Page(second, shared.url + "/")]
        for page, name in zip(pages, names):
            page.open(name)
        assert pair_key(*pages[0].pair()) != pair_key(*pages[1].pair()), "a pair handed to one voter is not given to the other"

        def vote(page: Page) -> list[str]:
            rng = random.Random(page.url + str(id(page)))
            for _ in range(8):
                page.act(rng.choice(["left", "right", "tie"]))
            return page.acked()

        with ThreadPoolExecutor(2) as pool:
            acked = dict(zip(names, pool.map(vote, pages)))
        pages[0].driver.refresh()
        pages[0].wait_ready()
        assert first.execute_script("return document.getElementById('voter').value") == "bo", "the name is kept in the browser"
        standing = len(SweepStore(shared.folder).read_votes())
        assert pages[0].text("counts").startswith(f"{standing} votes · 8 yours"), "the counts of the page, for this voter"
    lines = vote_lines(shared.folder)
    for name in names:
        assert sorted(line["vote"] for line in lines if line["voter"] == name) == sorted(acked[name])


def test_undo_takes_the_vote_back_with_a_new_line_and_shows_the_pair_again(shared, tmp_path):
    with browser(tmp_path / "profile") as driver:
        page = Page(driver, shared.url + "/")
        page.open("dee")
        page.press("undo")
        page.wait.until(lambda _: page.text("status") == "nothing to undo")
        pair = page.pair()
        page.act("left")
        voted = page.acked()[-1]
        page.act("undo")
        assert page.pair() == pair, "the undone pair comes back, sides as they were"
        assert page.text("reveal") == "vote taken back: choose again"
        page.act("right")
        page.act("skip")
        assert "left was" not in page.text("reveal"), "a skip reveals nothing"
    mine = [line for line in vote_lines(shared.folder) if line["voter"] == "dee"]
    assert [line["kind"] for line in mine] == ["vote", "undo", "vote", "skip"]
    assert mine[1]["undoes"] == voted and (mine[1]["left"], mine[1]["right"]) == pair
    standing = SweepStore(shared.folder).read_votes()
    assert list(standing.loc[standing["voter"] == "dee", "choice"]) == ["right"], "the undone vote no longer counts"


# ---------------------------------------------------------------- HTTP


def test_a_server_killed_mid_request_keeps_every_acknowledged_vote_and_goes_on(sweep, tmp_path):
    """Four clients vote as fast as they can; SIGKILL lands among their requests. Every vote that got its 200 is on disk,
    and the restarted server counts them and hands out a pair shown least."""
    folder = copy_of(sweep, tmp_path)
    server = start_compare(folder)
    pairs = [(c.first, c.second) for c in candidates_of(folder)]
    acked: list[str] = []
    enough = threading.Event()

    def client(number: int) -> None:
        rng = random.Random(number)
        with httpx.Client(timeout=10) as http:
            while True:
                left, right = rng.choice(pairs)
                try:
                    reply = http.post(
                        f"{server.url}/api/vote", json={"left": left, "right": right, "choice": "left", "voter": f"v{number}"}
                    )
                except httpx.HTTPError:
                    return  # the server is gone
                assert reply.status_code == 200, reply.text
                acked.append(reply.json()["vote"])
                if len(acked) >= 40:
                    enough.set()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    assert enough.wait(60), server.log.read_text()
    server.kill()
    for thread in threads:
        thread.join(30)
    on_disk = [line["vote"] for line in vote_lines(folder)]
    assert set(acked) <= set(on_disk) and len(on_disk) == len(set(on_disk))

    again = start_compare(folder)
    assert httpx.get(f"{again.url}/health").json()["votes"] == len(on_disk), "the restarted server reads them back"
    shown = Counter(pair_key(line["left"], line["right"]) for line in vote_lines(folder))
    offered = httpx.get(f"{again.url}/api/pair", params={"voter": "ed"}).json()["pair"]
    assert shown[pair_key(offered["left"], offered["right"])] == min(shown.get(p, 0) for p in pairs), "it goes on where it stopped"
    assert again.stop() == 0


def candidates_of(folder: Path) -> list[Candidate]:
    plan = pd.read_parquet(folder / "plan.parquet")
    return candidate_pairs(vote_cells(plan).to_dict(), {i: (int(s),) for i, s in zip(plan["id"], plan["seed"])})


def raw_get(url: str, path: str) -> bytes:
    """A GET with the path exactly as given (HTTP clients would tidy `..` away before sending)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while chunk := connection.recv(65536):
            reply += chunk
    return reply


def one_line_error(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    assert "\n" not in reply.text.strip() and set(reply.json()) == {"error"}, reply.text
    return reply.json()["error"]


def test_traversal_bad_and_oversized_bodies_are_refused_with_one_line(shared):
    before = (shared.folder / "votes.jsonl").read_bytes() if (shared.folder / "votes.jsonl").exists() else b""
    left, right = candidates_of(shared.folder)[0].key
    for path in (
        "/image/..%2Fplan.parquet",
        "/image/..%2F..%2F..%2Fetc%2Fpasswd",
        "/image/%2e%2e%2fresults.jsonl",
        "/images/plan.parquet",
        f"/image/{left}.png/../../plan.parquet",
        "/image/0000000000000000",
        f"/image/{left}%00",
    ):
        reply = httpx.get(shared.url + path)
        assert one_line_error(reply, 404) and b"PAR1" not in reply.content, path
    for path in ("/image/../plan.parquet", "/image/../../../../etc/passwd", "/../votes.jsonl", "/image/.."):  # as typed
        head, _, body = raw_get(shared.url, path).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404") and set(json.loads(body)) == {"error"} and b"\n" not in body, path
    assert httpx.get(f"{shared.url}/image/{left}").headers["content-type"] == "image/png"

    vote = {"left": left, "right": right, "choice": "left", "voter": "fay"}
    assert "over 4096 bytes" in one_line_error(shared.post("/api/vote", {**vote, "voter": "x" * 5000}), 413)
    json_type = {"content-type": "application/json"}
    chunked = httpx.post(f"{shared.url}/api/vote", content=iter([b'{"left": "', b"a" * 5000, b'"}']), headers=json_type)
    assert "over 4096 bytes" in one_line_error(chunked, 413), "a body without a declared length is cut off too"
    assert one_line_error(httpx.post(f"{shared.url}/api/vote", content=b"{not json", headers=json_type), 400) == "the body must be JSON"
    assert one_line_error(shared.post("/api/vote", [vote]), 400) == "the body must be a JSON object"
    assert one_line_error(shared.post("/api/vote", {**vote, "choice": "both"}), 400).startswith("choice:")
    assert one_line_error(shared.post("/api/vote", {**vote, "left": "../plan.parquet"}), 400).startswith("left:")
    assert one_line_error(shared.post("/api/vote", {**vote, "winner": "left"}), 400).startswith("winner: unknown field")
    assert one_line_error(shared.post("/api/vote", {**vote, "voter": "a\nb"}), 400).startswith("voter:")
    seeds = pd.read_parquet(shared.folder / "plan.parquet").set_index("id")["seed"]
    other_seed = next(c.second for c in candidates_of(shared.folder) if seeds[c.second] != seeds[left])
    assert one_line_error(shared.post("/api/vote", {**vote, "right": other_seed}), 400).startswith("left, right: not a pair")
    assert one_line_error(shared.post("/api/undo", {"vote": "nope", "voter": "fay"}), 400).startswith("vote:")
    plain = httpx.post(f"{shared.url}/api/vote", content=json.dumps(vote), headers={"content-type": "text/plain"})
    assert one_line_error(plain, 415), "a form or text/plain post from another web page is not a vote"
    assert one_line_error(httpx.get(f"{shared.url}/health", headers={"host": "attacker.example:80"}), 403)
    after = (shared.folder / "votes.jsonl").read_bytes() if (shared.folder / "votes.jsonl").exists() else b""
    assert after == before, "nothing refused reached votes.jsonl"


def test_another_host_needs_a_token_and_the_page_takes_it_once(sweep, tmp_path):
    folder = copy_of(sweep, tmp_path)
    refused = run_cli("compare", str(folder), "compare.host=0.0.0.0", cwd=tmp_path, env={"LORA_SWEEP_COMPARE_TOKENS": ""})
    assert (
        refused.code == 2 and refused.err.count("\n") == 1 and "compare.host" in refused.err and "LORA_SWEEP_COMPARE_TOKENS" in refused.err
    )
    server = start_compare(folder, env={"LORA_SWEEP_COMPARE_TOKENS": "tok-1f2e3d"})
    try:
        assert "needs a token" in one_line_error(httpx.get(server.url + "/"), 401)
        assert one_line_error(httpx.get(server.url + "/?token=wrong"), 401)
        with httpx.Client(base_url=server.url) as http:
            first = http.get("/?token=tok-1f2e3d")
            assert first.status_code == 303 and first.headers["location"] == "/", "the token leaves the address bar"
            assert "HttpOnly" in first.headers["set-cookie"] and "SameSite=strict" in first.headers["set-cookie"]
            assert http.get("/").status_code == 200 and http.get("/api/pair").json()["pair"], "the cookie carries it from then on"
        assert httpx.get(server.url + "/api/pair", headers={"authorization": "Bearer tok-1f2e3d"}).status_code == 200
    finally:
        assert server.stop() == 0, server.log.read_text()


def test_a_folder_that_is_not_a_sweep_is_one_line(tmp_path):
    result = run_cli("compare", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert result.code == 2 and result.err.strip().count("\n") == 0 and "is not a sweep folder" in result.err, result.err
    usage = run_cli("compare", cwd=tmp_path)
    assert usage.code == 2 and usage.out.startswith("usage: lora-sweep compare SWEEP_FOLDER")


# ---------------------------------------------------------------- the pair choice (pure)


def demo_candidates() -> list[Candidate]:
    cells = {f"{cell}{seed}": cell for cell in "abcd" for seed in (0, 1)}
    return candidate_pairs(cells, {image: (int(image[1]),) for image in cells})


def test_every_pair_is_shown_once_before_any_twice_and_sides_vary():
    candidates, rng = demo_candidates(), random.Random(0)
    assert len(candidates) == 12 and all(c.first_cell != c.second_cell and c.first[1] == c.second[1] for c in candidates)
    shown: Counter = Counter()
    sides: Counter = Counter()
    for number in range(36):
        pair = choose_pair(candidates, shown, pd.DataFrame(), rng)
        key = pair_key(pair.left, pair.right)
        assert shown[key] == number // 12, "no pair a second time before every pair was shown once"
        shown[key] += 1
        sides[pair.left == min(key)] += 1
    assert sides[True] > 5 and sides[False] > 5
    assert choose_pair([], shown, pd.DataFrame(), rng) is None


def test_the_least_certain_cell_pair_comes_first_among_pairs_shown_as_often():
    candidates = demo_candidates()
    ranking = pd.DataFrame(
        {"cell": list("abcd"), "human_low": [2.0, 0.1, -0.2, -3.0], "human_high": [3.0, 1.0, 0.8, -2.0]}
    )  # b and c overlap most; a and d not at all
    shown = Counter({c.key: 1 for c in candidates})
    for seed in range(10):
        pair = choose_pair(candidates, shown, ranking, random.Random(seed))
        assert {pair.left[0], pair.right[0]} == {"b", "c"}
    untried = next(c for c in candidates if {c.first_cell, c.second_cell} == {"a", "d"})
    shown[untried.key] = 0
    pair = choose_pair(candidates, shown, ranking, random.Random(0))
    assert pair_key(pair.left, pair.right) == untried.key, "a pair never shown comes before a more uncertain one shown once"
    shown[untried.key] = 1
    on_screen = {c.key: 1 for c in candidates if {c.first_cell, c.second_cell} == {"b", "c"}}
    pair = choose_pair(candidates, shown, ranking, random.Random(0), on_screen)
    assert {pair.left[0], pair.right[0]} != {"b", "c"}, "pairs on other voters' screens wait while others are as new"
