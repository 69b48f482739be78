"""The chat page in a real headless Chromium, against a real cluster of 3 processes on 127.0.0.1.

Selenium drives Debian's /usr/bin/chromium through /usr/bin/chromedriver (named explicitly, so
Selenium Manager never downloads a driver). The web app runs in a thread (werkzeug make_server).
Screenshots go to artifacts/ (git-ignored): browser-chat.png, browser-chat-phone.png.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from helpers import serve_app

from nanopipe.decoding import SamplingParams
from nanopipe.tokenizer import get_tokenizer
from nanopipe.web.app import create_app, settings_from_configs

pytestmark = pytest.mark.browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
_missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
if _missing:
    pytest.skip(f"{' and '.join(_missing)} not installed (apt-get install chromium chromium-driver)",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402  (only once we know there is a browser to drive)
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

EOT = 50256


def serve(app):
    """The app on a free port of 127.0.0.1, in a thread: (url of the page, server)."""
    url, srv = serve_app(app)
    return url + "/", srv


@pytest.fixture(scope="module")
def web(cluster):
    app = create_app(settings_from_configs(cluster.config_dir, leader=cluster.leader_addr))
    app.config["TOKENIZER"] = get_tokenizer()       # as `nanopipe web` does: not during the first chat
    url, srv = serve(app)
    yield url
    srv.shutdown()


def chromium(user_data_dir) -> webdriver.Chrome:
    """A headless Chromium, driven through chromedriver, keeping its browser log."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={user_data_dir}", "--window-size=1280,900"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    driver = chromium(tmp_path_factory.mktemp("chromium"))
    yield driver
    driver.quit()


def greedy_text(engine, prompt: str, max_tokens: int) -> tuple:
    """(text, tokens) of what the page asks for: the prompt as a user turn in the chat template,
    greedy, ending at the template's next "\nUser:" turn."""
    from nanopipe.web.openai import CHAT_STOP, chat_prompt
    tok = get_tokenizer()
    ids = tok.encode(chat_prompt([{"role": "user", "content": prompt}]))
    result = engine.generate(ids, SamplingParams("greedy", max_tokens=max_tokens, stop=(CHAT_STOP,)))
    return result["text"], result["tokens_generated"]


def set_field(driver, field_id: str, value):
    box = driver.find_element(By.ID, field_id)
    box.clear()
    box.send_keys(str(value))


def wait(driver, condition, timeout=30, message=""):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message)


# Records the reply's text after every DOM change, with the reply's state at that moment: a reply
# that streams shows a growing prefix while it is still "streaming"; one that does not, appears whole.
WATCH_REPLIES = """
window.__snapshots = [];
new MutationObserver((records) => {
  for (const r of records) {
    if (!r.target.classList || !r.target.classList.contains("text")) continue;
    const msg = r.target.closest(".msg");
    window.__snapshots.push({text: r.target.textContent, state: msg.dataset.state});
  }
}).observe(document.getElementById("log"), {childList: true, subtree: true, characterData: true});
"""


def send(driver, prompt: str):
    n = len(driver.find_elements(By.CSS_SELECTOR, ".msg.bot"))
    box = driver.find_element(By.ID, "prompt")
    box.send_keys(prompt)
    driver.find_element(By.ID, "send").click()
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.bot")) == n + 1, 10, "no reply appeared")
    reply = driver.find_elements(By.CSS_SELECTOR, ".msg.bot")[-1]
    wait(driver, lambda d: reply.get_attribute("data-state") != "streaming", 60, "the reply never finished")
    return reply


def test_chat_streams_a_greedy_reply_equal_to_a_single_process(browser, web, tiny_engine):
    d = browser
    d.get(web)
    wait(d, lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "up", 20, "never connected")
    wait(d, lambda d: len(Select(d.find_element(By.ID, "strategy")).options) == 4, 10, "no strategies loaded")
    nodes = d.find_elements(By.CSS_SELECTOR, "#nodes .node")
    assert [n.get_attribute("data-status") for n in nodes] == ["up", "up", "up"]
    assert "node1" in nodes[1].text and "layer" in nodes[1].text

    Select(d.find_element(By.ID, "strategy")).select_by_value("greedy")
    for field, value in (("max_tokens", 24), ("temperature", 0.65), ("top_p", 0.85), ("top_k", 7), ("seed", 3)):
        set_field(d, field, value)
    d.execute_script(WATCH_REPLIES)
    prompt = "The three small computers on my desk"
    reply = send(d, prompt)

    assert reply.get_attribute("data-state") == "done", reply.find_element(By.CSS_SELECTOR, ".status").text
    text = d.execute_script("return arguments[0].querySelector('.text').textContent", reply)
    expected, n = greedy_text(tiny_engine, prompt, 24)
    assert text and text == expected.lstrip()                  # the bubble drops GPT-2's leading space
    assert reply.get_attribute("data-tokens") == str(n)        # one token event per token, none dropped

    snapshots = d.execute_script("return window.__snapshots")
    growing = [s["text"] for s in snapshots if s["state"] == "streaming" and s["text"]]
    assert len(growing) >= 2, f"the reply did not appear token by token: {snapshots}"
    assert all(text.startswith(s) for s in growing) and len(growing[0]) < len(text)

    chips = {c.get_attribute("data-param"): c.find_element(By.CSS_SELECTOR, ".value").text
             for c in reply.find_elements(By.CSS_SELECTOR, ".params .chip")}
    # greedy uses none of temperature, top_p, top_k: the page does not send them and shows no chip for them
    assert chips == {"tokens": str(n), "strategy": "greedy", "seed": "3"}
    stats = {s.get_attribute("data-stat"): s.text for s in reply.find_elements(By.CSS_SELECTOR, ".stats .stat")}
    assert stats["tokens"] == f"{n} tokens" and stats["ttft"].startswith("first token ") and "tok/s" in stats["tps"]
    rows = reply.find_elements(By.CSS_SELECTOR, ".nodebar .nb-row")
    assert [r.get_attribute("data-rank") for r in rows] == ["0", "1", "2"]
    widths = [d.execute_script("return arguments[0].querySelector('.nb-compute').getBoundingClientRect().width", r)
              for r in rows]
    assert max(widths) > 0

    # a second turn with the configured default strategy, so the screenshot shows a conversation
    d.find_element(By.ID, "reset").click()
    second = send(d, "Once upon a time")
    assert second.get_attribute("data-state") == "done"
    assert second.find_element(By.CSS_SELECTOR, '[data-param="strategy"] .value').text == "greedy"  # the config's
    # the page holds the conversation: turn 2 sent turn 1 as history, whose KV cache every node kept
    stats2 = {s.get_attribute("data-stat"): s.text for s in second.find_elements(By.CSS_SELECTOR, ".stats .stat")}
    reused = int(stats2["reused"].split()[0])
    prompt_tokens = int(stats2["prompt"].split()[1])
    first_prompt = len(get_tokenizer().encode(f"User: {prompt}\nAssistant:"))
    # all that turn 1 computed: its prompt and its reply (but the last token, never fed back)
    assert first_prompt + n - 1 <= reused < prompt_tokens, stats2
    assert stats2["prefill"].startswith("prefill ") and stats2["ttft"].startswith("first token "), stats2

    ARTIFACTS.mkdir(exist_ok=True)
    d.set_window_size(1280, 1040)
    d.execute_script("document.getElementById('log').scrollTop = 0")
    d.save_screenshot(str(ARTIFACTS / "browser-chat.png"))
    d.set_window_size(1280, 900)
    severe = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe

    d.find_element(By.ID, "clear").click()          # "New chat": the conversation starts over
    assert d.find_elements(By.CSS_SELECTOR, "#log .msg") == []
    assert d.execute_script("return document.getElementById('empty').hidden") is False


def test_synthetic_weights_show_a_badge(browser, web):
    """The tiny model is random weights from init_weights: the page says so beside the model name."""
    from nanopipe.weights import SYNTHETIC_NOTE
    d = browser
    d.get(web)
    badge = d.find_element(By.ID, "synthetic")
    wait(d, lambda d: badge.is_displayed(), 20, "no SYNTHETIC badge")
    assert badge.text == "SYNTHETIC" and badge.get_attribute("title") == SYNTHETIC_NOTE
    assert d.find_element(By.ID, "model").text == "local"


def test_page_fits_a_phone(browser, web):
    d = browser
    d.set_window_size(390, 844)
    try:
        d.get(web)
        wait(d, lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "up", 20, "never connected")
        assert not d.find_element(By.ID, "settings").is_displayed()            # folded away behind a button
        d.find_element(By.ID, "prompt").send_keys("Hello")
        d.find_element(By.ID, "send").click()
        wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.bot[data-state="done"]'), 30, "no reply")
        overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than a phone"
        d.save_screenshot(str(ARTIFACTS / "browser-chat-phone.png"))
        d.find_element(By.ID, "settings-btn").click()
        assert d.find_element(By.ID, "settings").is_displayed()
    finally:
        d.set_window_size(1280, 900)


def test_sse_parser_survives_every_split_of_the_stream(browser, web):
    """Cut a stream at every byte and feed the pieces as a network would: the events must not change."""
    browser.get(web)
    result = browser.execute_script("""
        const stream = 'data: {"token":1,"text":"h\\u00e9"}\\n\\n: a comment\\n\\nevent: status\\n' +
                       'data: {"status":"waiting"}\\n\\nevent: done\\r\\ndata: {"response":"\\u4f60"}\\r\\n\\r\\n';
        const bytes = new TextEncoder().encode(stream);
        const whole = new window.nanopipe.SSEParser().push(new TextDecoder().decode(bytes));
        const bad = [];
        for (let cut = 1; cut < bytes.length; cut++) {
          const dec = new TextDecoder(), p = new window.nanopipe.SSEParser();
          const got = [...p.push(dec.decode(bytes.slice(0, cut), {stream: true})),
                       ...p.push(dec.decode(bytes.slice(cut), {stream: true})), ...p.push(dec.decode())];
          if (JSON.stringify(got) !== JSON.stringify(whole)) bad.push(cut);
        }
        return {whole, bad, n: bytes.length};
    """)
    assert [(e["event"], e["data"]) for e in result["whole"]] == [
        ("message", '{"token":1,"text":"hé"}'), ("status", '{"status":"waiting"}'), ("done", '{"response":"你"}')]
    assert result["bad"] == [], f"events changed when the stream was cut at bytes {result['bad']}"


def test_leader_down_is_shown_and_the_page_reconnects_by_itself(browser, cluster):
    from nanopipe.tools.localcluster import free_ports
    app = create_app(settings_from_configs(cluster.config_dir, leader=f"127.0.0.1:{free_ports(1)[0]}"))
    url, srv = serve(app)
    d = browser
    try:
        d.get(url)
        wait(d, lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "down", 20, "not shown down")
        assert "leader unreachable" in d.find_element(By.ID, "conn-text").text
        d.find_element(By.ID, "prompt").send_keys("Hello")
        d.find_element(By.ID, "send").click()
        reply = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.bot[data-state="error"]'), 20, "no error")[0]
        assert "unreachable" in reply.find_element(By.CSS_SELECTOR, ".error-text").text
        bubble = reply.find_element(By.CSS_SELECTOR, ".bubble").text
        assert "unreachable" in bubble, f"the failed reply's bubble shows {bubble!r}, not the error"
        assert reply.find_element(By.CSS_SELECTOR, ".status button").text == "Retry"

        app.config["LEADER"] = cluster.leader_addr            # the leader "comes back"
        t0 = time.time()
        wait(d, lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "up", 30, "never reconnected")
        assert time.time() - t0 < 30
        reply.find_element(By.CSS_SELECTOR, ".status button").click()
        wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '.msg.bot[data-state="done"]'), 30, "retry failed")
    finally:
        srv.shutdown()


# ---------------------------------------------------------------------------------------------
# The page opened as a file, or served from another origin (python -m http.server), with the API
# elsewhere: it finds the API (http://localhost:8000/ unless told), says what to start when nothing
# answers there, and remembers the address it is given


def point_page_at(d, api: str):
    """Give the page the API's address as a user would: the Server panel, Connect."""
    panel = d.find_element(By.ID, "api-panel")
    if not panel.is_displayed():
        d.find_element(By.ID, "api-btn").click()
    box = d.find_element(By.ID, "api-input")
    box.clear()
    box.send_keys(api)
    panel.find_element(By.CSS_SELECTOR, 'button[type="submit"]').click()


def chat_works_from_here(d, api: str, unreachable: str):
    """The page, loaded from wherever, first says what to start at an address where nothing answers,
    then chats through the API at `api`, and remembers it across a reload."""
    assert d.execute_script("return getComputedStyle(document.querySelector('.topbar')).display") == "flex", \
        "style.css did not load"
    d.find_element(By.ID, "api-btn").click()
    assert d.find_element(By.ID, "api-input").get_attribute("value") == "http://localhost:8000/"
    point_page_at(d, unreachable)
    wait(d, lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "down", 20, "not shown down")
    assert f"no API at {unreachable}/" in d.find_element(By.ID, "conn-text").text
    note = d.find_element(By.ID, "api-note").text
    assert d.find_element(By.ID, "api-panel").is_displayed() and "nanopipe web" in note and "nanopipe serve" in note

    point_page_at(d, api)
    wait(d, lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "up", 20, "never connected")
    wait(d, lambda d: len(Select(d.find_element(By.ID, "strategy")).options) == 4, 10, "no strategies loaded")
    reply = send(d, "Hello from elsewhere")
    assert reply.get_attribute("data-state") == "done", reply.find_element(By.CSS_SELECTOR, ".bubble").text
    assert int(reply.get_attribute("data-tokens")) > 0

    d.refresh()                 # remembered: connects again without being told
    try:
        wait(d, lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "up", 30)
    except TimeoutException:
        saved = d.execute_script("return localStorage.getItem('nanopipe.apiBase')")
        raise AssertionError(f"not connected after a reload: {d.find_element(By.ID, 'conn-text').text!r}, "
                             f"saved API {saved!r}") from None
    d.execute_script("localStorage.clear()")


def test_page_opened_as_a_file_reaches_the_api(browser, web):
    from nanopipe.tools.localcluster import free_ports
    from nanopipe.web.app import web_dir
    d = browser
    d.get(Path(web_dir(), "index.html").as_uri())
    chat_works_from_here(d, web.rstrip("/"), f"http://127.0.0.1:{free_ports(1)[0]}")


def test_page_served_from_another_origin_reaches_the_api(browser, web):
    """`cd web && python -m http.server 8080`, the API on another port: cross-origin, admitted by default."""
    import subprocess
    import sys
    import urllib.request

    from nanopipe.tools.localcluster import free_ports
    from nanopipe.web.app import web_dir
    port, unused = free_ports(2)
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              cwd=web_dir(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/app.js", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        d = browser
        d.get(f"http://localhost:{port}/index.html")
        chat_works_from_here(d, web.rstrip("/"), f"http://127.0.0.1:{unused}")
    finally:
        server.terminate()
        server.wait(10)
