"""The cluster page's "leave" button in a real headless Chromium, against a real cluster of 3 processes
with an API token set (api_token in cluster_config.yaml): each worker's card has the button, rank 0's
has none. Cancelling the confirmation sends nothing. With a stale token the leader's 401 is shown on
the card and the page asks for the token (its token panel, as for chat); with the right one the node
is drained, the leader's answer is shown, and the next refresh shows the card "gone" with the reason.
Asked for rank 0 (the page's own function: there is no button), the route's refusal is shown as an error.

The browser and web app are test_browser.py's (Debian's chromium through chromedriver).
"""
from __future__ import annotations

import pytest
from test_browser import chromium, serve, wait

from nanopipe.tools.localcluster import LocalCluster
from nanopipe.web.app import create_app, settings_from_configs

pytestmark = pytest.mark.browser

from selenium.webdriver.common.by import By  # noqa: E402  (test_browser skipped the module without a browser)
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

API_TOKEN = "page-secret"

CARDS = """
const text = (root, sel) => { const e = root.querySelector(sel); return e ? e.textContent : null; };
return [...document.querySelectorAll("#cl-ring .cnode")].map((c) => {
  const b = c.querySelector(".cn-leave");
  return {rank: c.dataset.rank, status: c.dataset.status, note: text(c, ".cn-note"),
          button: !!b && b.offsetParent !== null, disabled: !!b && b.disabled,
          said: text(c, ".cn-leave-msg"), kind: c.querySelector(".cn-leave-msg").dataset.kind};
});
"""


def cards(d) -> dict:
    return {c["rank"]: c for c in d.execute_script(CARDS)}


def click_leave(d, rank: int):
    d.find_element(By.CSS_SELECTOR, f'#cl-ring .cnode[data-rank="{rank}"] .cn-leave').click()
    return WebDriverWait(d, 10).until(expected_conditions.alert_is_present())


def test_the_leave_button_drains_a_worker_with_the_api_token(tiny_weights, tmp_path):
    with LocalCluster(tiny_weights, nodes=3, ready_timeout=90, workdir=str(tmp_path / "cluster"),
                      cluster_extra={"api_token": API_TOKEN, "rejoin_grace_s": 60}) as cl:
        app = create_app(settings_from_configs(cl.config_dir, leader=cl.leader_addr))
        assert app.config["API_TOKEN"] == API_TOKEN
        url, srv = serve(app)
        d = chromium(tmp_path / "chromium")
        try:
            d.set_window_size(1280, 900)
            d.get(url + "#cluster")
            # no token yet: the page asks for one, as for chat; given, the cards come
            wait(d, lambda d: d.find_element(By.ID, "token-panel").is_displayed(), 30, "no token asked for")
            d.find_element(By.ID, "token-input").send_keys(API_TOKEN)
            d.find_element(By.CSS_SELECTOR, "#token-panel button[type=submit]").click()
            wait(d, lambda d: [c["status"] for c in cards(d).values()] == ["up"] * 3, 30, f"not 3 up: {cards(d)}")
            shown = cards(d)
            assert [shown[r]["button"] for r in "012"] == [False, True, True], shown     # none for the leader

            # cancelled: nothing is sent, the node stays
            click_leave(d, 2).dismiss()
            assert cards(d)["2"]["said"] == "" and cards(d)["2"]["status"] == "up", cards(d)

            # a stale token: the leader's refusal on the card, and the token panel asks again
            d.execute_script('localStorage.setItem("nanopipe.apiToken", "stale");'
                             'document.getElementById("token-panel").hidden = true;')
            click_leave(d, 2).accept()
            wait(d, lambda d: cards(d)["2"]["kind"] == "error", 30, f"no error shown: {cards(d)}")
            assert "give the API token" in cards(d)["2"]["said"], cards(d)["2"]
            assert d.find_element(By.ID, "token-panel").is_displayed()
            d.find_element(By.ID, "token-input").send_keys(API_TOKEN)
            d.find_element(By.CSS_SELECTOR, "#token-panel button[type=submit]").click()
            wait(d, lambda d: cards(d)["2"]["status"] == "up", 30, f"rank 2 not shown up again: {cards(d)}")

            # the right token: drained, the leader's answer shown, the card turns gone at the next refresh
            click_leave(d, 2).accept()
            wait(d, lambda d: cards(d)["2"]["kind"] in ("busy", "ok"), 10, f"no progress shown: {cards(d)}")
            wait(d, lambda d: cards(d)["2"]["kind"] == "ok", 120, f"no answer shown: {cards(d)}")
            assert cards(d)["2"]["said"] == "rank 2 (node2) drained: ring 0 -> 1 -> 0", cards(d)["2"]
            wait(d, lambda d: cards(d)["2"]["status"] == "gone", 30, f"rank 2 not shown gone: {cards(d)}")
            shown = cards(d)
            assert "drained by `nanopipe leave`" in shown["2"]["note"] and not shown["2"]["button"], shown["2"]
            assert shown["0"]["status"] == shown["1"]["status"] == "up", shown
            assert cl.procs[2].wait(30) == 0, cl.logs()

            # rank 0: the route refuses; the page says so on the leader's card
            d.execute_script("window.nanopipe.leaveNode(0, 'node0')")
            WebDriverWait(d, 10).until(expected_conditions.alert_is_present()).accept()
            wait(d, lambda d: cards(d)["0"]["kind"] == "error", 30, f"no error for rank 0: {cards(d)}")
            said = cards(d)["0"]["said"]
            assert said.startswith("cannot drain rank 0 (node0): rank: must be a worker's rank"), said
            assert cards(d)["0"]["status"] == "up", cards(d)
            severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE" and "401" not in e["message"]
                      and "400" not in e["message"]]
            assert severe == [], severe
        finally:
            d.quit()
            srv.shutdown()
