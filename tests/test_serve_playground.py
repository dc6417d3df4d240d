"""The playground page in a real headless browser (Debian's chromium, driven by Selenium and chromedriver):
load the page, pick a state, see its metadata, send a message, and see streamed text equal to the API's answer.

``scripts/install_browser.sh`` (run by ``.ci/run``) installs the browser; where it cannot, this test skips and
says why. The server only ever listens on 127.0.0.1.
"""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402
from serve_helpers import KEY, Running, random_state  # noqa: E402

import statetune  # noqa: E402
from statetune.commands.serve import ServeOptions  # noqa: E402

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM or not DRIVER:
        pytest.skip("no headless browser: run scripts/install_browser.sh (Debian's chromium and chromium-driver)")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", "--proxy-server=direct://", "--proxy-bypass-list=*"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    except Exception as e:  # a browser that cannot start here (no display libraries...) is a skip, not a failure
        pytest.skip(f"chromium could not start: {type(e).__name__}: {str(e).splitlines()[0]}")
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    model = statetune.load_model(tiny_ckpt("rwkv7"))
    (root / "states").mkdir()
    statetune.save_state(root / "states" / "persona.safetensors", random_state(model, 4), model,
                         {"tokenizer": "bytes", "prompt_template": "Q: {q}\n\nA:", "trained": {"steps": 42}},
                         with_shift=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    running = Running(ServeOptions(model=str(tiny_ckpt("rwkv7")), states=str(root / "states"), api_key=KEY,
                                   model_name="base", max_tokens_limit=100))
    yield running
    running.stop()
    torch.set_num_threads(threads)


def test_the_page_is_off_unless_asked_for_off_loopback(tiny_ckpt):
    assert ServeOptions(model=str(tiny_ckpt("rwkv7"))).serves_playground
    assert not ServeOptions(model=str(tiny_ckpt("rwkv7")), host="0.0.0.0").serves_playground
    assert ServeOptions(model=str(tiny_ckpt("rwkv7")), host="0.0.0.0", playground=True).serves_playground


def test_chat_in_the_browser_streams_the_api_s_answer(server, browser):
    messages = [{"role": "user", "content": "Hello from the browser"}]
    expect = server.client().chat.completions.create(model="persona", messages=messages, max_tokens=40,
                                                     temperature=0).choices[0].message.content
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 30)
    key = browser.find_element(By.ID, "key")
    key.send_keys(KEY)
    browser.execute_script("document.getElementById('key').dispatchEvent(new Event('change'))")
    wait.until(lambda d: "persona" in [o.get_attribute("value")
                                       for o in d.find_elements(By.CSS_SELECTOR, "#state option")])
    Select(browser.find_element(By.ID, "state")).select_by_value("persona")
    wait.until(lambda d: "Q: {q}" in d.find_element(By.ID, "meta").text)
    assert "42" in browser.find_element(By.ID, "meta").text  # how it was trained
    for field, value in (("temperature", "0"), ("max_tokens", "40")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "input").send_keys(messages[0]["content"])
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.ID, "status").text in ("done", "error"))
    assert browser.find_element(By.ID, "status").text == "done"
    assert answer_text(browser) == expect
    # a follow-up turn resends the history; the answer still equals the API's
    messages += [{"role": "assistant", "content": expect}, {"role": "user", "content": "And again"}]
    expect2 = server.client().chat.completions.create(model="persona", messages=messages, max_tokens=40,
                                                      temperature=0).choices[0].message.content
    browser.find_element(By.ID, "input").send_keys("And again")
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) == 2
               and d.find_element(By.ID, "status").text in ("done", "error"))
    assert browser.find_element(By.ID, "status").text == "done"
    assert answer_text(browser) == expect2


def answer_text(browser) -> str:
    """The streamed answer exactly as the page holds it (not as rendered: no whitespace trimmed)."""
    return browser.execute_script("return document.getElementById('answer').textContent")


def test_the_page_and_its_files_need_no_key_but_the_api_does(server):
    assert server.get("/", key=None).status_code == 200
    assert server.get("/playground/app.js", key=None).status_code == 200
    assert server.get("/playground/../registry.py", key=None).status_code == 404
    assert server.get("/v1/models", key=None).status_code == 401
