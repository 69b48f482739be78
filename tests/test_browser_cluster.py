"""The page's Cluster view in a real headless Chromium, against a real cluster of 3 processes: it shows
the 3 nodes up; a killed worker is shown rejoining and the events log says it died; restarted, it is
back up and the log says it rejoined. The chat view is still there.

The browser and web app are test_browser.py's (Debian's chromium through chromedriver). Screenshots:
`make screenshots` (NANOPIPE_SCREENSHOTS=docs) saves docs/cluster-page.png, cluster-page-phone.png and
cluster-page-rejoining.png, the ones docs/WEB.md shows; without it they go to artifacts/ (git-ignored).
"""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import pytest
from test_browser import ARTIFACTS, chromium, serve, wait

from nanopipe.tools.localcluster import LocalCluster
from nanopipe.web.app import create_app, settings_from_configs

pytestmark = pytest.mark.browser

from selenium.webdriver.common.by import By  # noqa: E402  (test_browser skipped the module without a browser)

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / os.environ["NANOPIPE_SCREENSHOTS"] if os.environ.get("NANOPIPE_SCREENSHOTS") else ARTIFACTS
GRACE_S = 120           # long enough that a killed worker is "rejoining" for the whole test, never "gone"


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def ring(tiny_weights):
    """3 real nodes with a long rejoin grace, and the web app in front of them: (cluster, url)."""
    with LocalCluster(tiny_weights, nodes=3, ready_timeout=90, cluster_extra={"rejoin_grace_s": GRACE_S}) as cl:
        app = create_app(settings_from_configs(cl.config_dir, leader=cl.leader_addr))
        url, srv = serve(app)
        # some traffic, so every stage has measured ms per step and link transit to show
        for prompt in ("The three small computers on my desk", "Once upon a time"):
            complete(app, prompt)
        yield cl, url, app
        srv.shutdown()


def complete(app, prompt: str, max_tokens: int = 24):
    r = app.test_client().post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.get_data(as_text=True)


@contextlib.contextmanager
def traffic(app):
    """Requests one after another in a thread while the block runs: the cluster's tokens/s "now"."""
    stop = threading.Event()

    def run():
        while not stop.is_set():
            complete(app, "The three small computers on my desk", 96)
    t = threading.Thread(target=run, daemon=True, name="traffic")
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(60)


# What the Cluster view shows, read in one go: the view redraws itself at every poll, so elements
# found one by one may be replaced in between.
SNAPSHOT = """
const text = (root, sel) => { const e = root.querySelector(sel); return e ? e.textContent : null; };
return {
  state: document.getElementById("cl-state").dataset.state,
  stateText: document.getElementById("cl-state-text").textContent,
  back: text(document, "#cl-ring .cl-link.back"),
  links: [...document.querySelectorAll("#cl-ring .cl-link:not(.back) .ms")].map((e) => e.textContent),
  cards: [...document.querySelectorAll("#cl-ring .cnode")].map((c) => ({
    rank: c.dataset.rank, status: c.dataset.status, host: text(c, ".cn-host"), layers: text(c, ".cn-layers"),
    memory: text(c, ".cn-mem-text"), ms: text(c, ".cn-ms"), transit: text(c, ".cn-transit"),
    blas: text(c, ".cn-blas"), note: text(c, ".cn-note"), width: c.getBoundingClientRect().width})),
  // oldest first (the page lists the newest first)
  events: [...document.querySelectorAll("#cl-events .cl-event")].reverse().map((e) => ({
    kind: e.dataset.kind, text: e.textContent})),
};
"""


def figures(d) -> dict:
    return d.execute_script("""return Object.fromEntries([...document.querySelectorAll("#cl-figures .stat")]
                                       .map((s) => [s.dataset.figure, s.textContent]));""")


def now_tok_s(d) -> float:
    """The cluster's tokens/s now as the page shows it ("11.8 tok/s now"); 0 while it shows "–"."""
    text = figures(d).get("now", "–").split()[0]
    return 0.0 if text == "–" else float(text)


def after(kinds: list, kind: str) -> list:
    """The events after the first `kind` ([] if there is none)."""
    return kinds[kinds.index(kind) + 1:] if kind in kinds else []


def snapshot(d) -> dict:
    return d.execute_script(SNAPSHOT)


def statuses(d) -> list:
    return [c["status"] for c in snapshot(d)["cards"]]


def event_kinds(d) -> list:
    return [e["kind"] for e in snapshot(d)["events"]]


def shoot(d, name: str):
    SHOTS.mkdir(exist_ok=True)
    d.save_screenshot(str(SHOTS / name))


def test_cluster_view_shows_the_three_nodes_up(browser, ring):
    cl, url, app = ring
    d = browser
    d.set_window_size(1280, 900)
    d.get(url + "#cluster")
    wait(d, lambda d: statuses(d) == ["up", "up", "up"], 30, f"not 3 nodes up: {statuses(d)}")
    assert not d.find_element(By.ID, "log").is_displayed(), "the chat shows under the cluster view"
    # every stage has reported its measured time (workers send theirs with their heartbeats)
    wait(d, lambda d: all(" measured" in c["ms"] and not c["ms"].startswith("–") for c in snapshot(d)["cards"]), 30,
         f"not every stage shows its measured ms per step: {snapshot(d)['cards']}")
    shown = snapshot(d)
    assert shown["state"] == "up" and "3/3 nodes up" in shown["stateText"], shown
    for rank, card in enumerate(shown["cards"]):
        assert card["rank"] == str(rank) and card["host"] == f"node{rank}", card
        assert card["layers"].startswith("layer"), card
        assert " MB of " in card["memory"], card
        assert card["blas"] not in ("", "not reported yet"), card
        assert "predicted" in card["ms"], card
        assert "ms to the next node" in card["transit"], card
    # the log: both workers joined, then the ring came up
    kinds = [e["kind"] for e in shown["events"]]
    assert kinds.count("joined") == 2 and "ring_up" in kinds, kinds
    assert "0 → 1 → 2 → 0" in shown["back"] and shown["back"].endswith(" ms"), shown["back"]
    assert len(shown["links"]) == 2 and all(t.endswith(" ms") for t in shown["links"]), shown["links"]
    with traffic(app):
        wait(d, lambda d: now_tok_s(d) > 0, 30, f"no tokens/s now while requests run: {figures(d)}")
        shoot(d, "cluster-page.png")
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


def test_cluster_view_fits_a_phone(browser, ring):
    _, url, _ = ring
    d = browser
    d.set_window_size(390, 844)
    try:
        d.get(url + "#cluster")
        wait(d, lambda d: statuses(d) == ["up", "up", "up"], 30, f"not 3 nodes up: {statuses(d)}")
        overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the cluster view is {overflow}px wider than a phone"
        widths = [c["width"] for c in snapshot(d)["cards"]]
        assert min(widths) > 300, f"the cards do not take the phone's width: {widths}"
        wider = d.execute_script("""
            const view = document.getElementById("cluster-view"), edge = view.getBoundingClientRect().right;
            return [...view.querySelectorAll("*")].filter((e) => e.getBoundingClientRect().right > edge + 0.5)
                   .map((e) => e.className + ": " + e.getBoundingClientRect().right);""")
        assert wider == [], f"parts of the cluster view stick out on a phone: {wider}"
        shoot(d, "cluster-page-phone.png")
    finally:
        d.set_window_size(1280, 900)


def test_a_killed_worker_is_shown_rejoining_then_back_up(browser, ring):
    cl, url, app = ring
    d = browser
    d.set_window_size(1280, 900)
    d.get(url + "#cluster")
    wait(d, lambda d: statuses(d) == ["up", "up", "up"], 30, f"not 3 nodes up: {statuses(d)}")

    cl.kill_rank(2)
    wait(d, lambda d: statuses(d) == ["up", "up", "rejoining"], 30, f"rank 2 not shown rejoining: {statuses(d)}")
    wait(d, lambda d: "died" in event_kinds(d), 10, f"no 'died' in the events log: {event_kinds(d)}")
    shown = snapshot(d)
    assert shown["state"] == "degraded" and "2/3 nodes up" in shown["stateText"], shown
    assert "requests wait for it" in shown["cards"][2]["note"], shown["cards"][2]
    died = [e["text"] for e in shown["events"] if e["kind"] == "died"]
    assert len(died) == 1 and "Worker 2 (node2) is down" in died[0], died
    shoot(d, "cluster-page-rejoining.png")

    cl.start_rank(2)
    wait(d, lambda d: statuses(d) == ["up", "up", "up"], 90, f"rank 2 not back up: {statuses(d)}")
    # the worker is up once it has loaded its layers; the ring closes a moment later
    wait(d, lambda d: "ring_up" in after(event_kinds(d), "rejoined"), 30, f"the ring not back up: {event_kinds(d)}")
    kinds = event_kinds(d)
    assert kinds.index("rejoined") > kinds.index("died"), kinds
    shown = snapshot(d)
    assert shown["state"] == "up" and shown["stateText"].startswith("ring up · 3/3 nodes up"), shown

    # the chat view is where it was
    d.find_element(By.ID, "tab-chat").click()
    wait(d, lambda d: d.find_element(By.ID, "log").is_displayed(), 5, "the chat did not come back")
    assert not d.find_element(By.ID, "cluster-view").is_displayed()
    strip = 'return [...document.querySelectorAll("#nodes .node")].map((n) => n.dataset.status)'
    # its node strip follows /health, which it checks again 1, 2, 4 ... s apart while a node is down
    wait(d, lambda d: d.execute_script(strip) == ["up"] * 3, 30, f"the chat's node strip: {d.execute_script(strip)}")
