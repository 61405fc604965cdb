"""The console in a real browser (Debian's Chromium driven by Playwright) against `cxygpt-dev up`: the fleet follows a
scale-up without a reload, a model's page follows its log, the playground streams an answer, explains a 413 and counts
down a 429; every page has labelled controls and readable contrast. Each page's screenshot is taken; with
CXYGPT_SCREENSHOTS_DIR=docs/console (`make screenshots`) they replace the README's."""
from __future__ import annotations

import json
import os
import re
import time

import httpx
import openai
import pytest
from test_devcluster import Dev, sim_md

from browser import accessibility_problems, launch
from harness import REPO, wait_until

pytestmark = pytest.mark.timeout(300)
CHAT, FLOOD = "console-chat", "console-flood"


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    d = Dev(tmp_path_factory.mktemp("dev"))
    d.console = json.loads((d.state / "ready").read_text())["console"]
    # a slow-ish model, so an answer visibly streams; and one of DEV_32G (60k tokens a minute) to flood
    d.apply(sim_md(CHAT, CHAT, env={"CXYGPT_SIM_ITL_MS": "40"}))
    d.apply(sim_md(FLOOD, FLOOD, profile="DEV_32G"))
    d.wait_phase(CHAT)
    d.wait_phase(FLOOD)
    wait_until(lambda: {CHAT, FLOOD} <= d.models(), timeout=30, what="both models routed")
    yield d
    d.stop()


@pytest.fixture(scope="module")
def browser(dev):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = launch(p)
        yield b
        b.close()


@pytest.fixture
def page(browser, dev):
    context = browser.new_context(viewport={"width": 1440, "height": 900}, base_url=dev.console)
    p = context.new_page()
    errors = []
    p.on("pageerror", lambda error: errors.append(error))
    yield p
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    given = os.environ.get("CXYGPT_SCREENSHOTS_DIR")
    return (REPO / given) if given else tmp_path_factory.mktemp("screenshots")


def shoot(page, shots, name: str):
    """The page as a person sees it, checked first for unnamed controls and unreadable text."""
    problems = accessibility_problems(page)
    assert not problems, f"{name}: {problems}"
    shots.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def card(page, model: str):
    return page.locator(f'article.card[data-model="default/{model}"]')


def test_the_fleet_shows_a_scale_up_without_a_reload(page, dev, shots):
    from playwright.sync_api import expect
    for _ in range(6):  # some traffic for the charts (streamed: time to first token is measured on streams)
        list(dev.client.chat.completions.create(model=CHAT, max_tokens=8, stream=True,
                                                messages=[{"role": "user", "content": "hi"}]))
    page.goto("/")
    expect(card(page, CHAT).locator('[data-testid="replicas"]')).to_have_text("1/1", timeout=15000)
    expect(card(page, CHAT).locator(".badge")).to_have_text("Ready")
    expect(card(page, FLOOD)).to_contain_text("DEV_32G")
    page.evaluate("window.notReloaded = true")
    dev.kubectl("scale", "md", CHAT, "--replicas=2")
    # the desired count first (the spec), then the second replica ready: each without a reload
    expect(card(page, CHAT).locator('[data-testid="replicas"]')).to_have_text(re.compile(r"[12]/2"), timeout=15000)
    expect(card(page, CHAT).locator('[data-testid="replicas"]')).to_have_text("2/2", timeout=60000)
    assert page.evaluate("window.notReloaded") is True
    # the charts, drawn once a few scrape rounds (5 s each) with the traffic have passed
    wait_until(lambda: int(page.get_attribute("#charts", "data-rounds") or 0) >= 4, timeout=60,
               what="four rounds charted")
    assert page.evaluate("document.querySelectorAll('#charts canvas').length") == 4
    expect(page.locator("#chart-legend")).to_contain_text(CHAT)
    shoot(page, shots, "fleet")


def test_a_model_page_follows_its_engine_log(page, dev, shots):
    from playwright.sync_api import expect
    page.goto(f"/models/default/{CHAT}")
    expect(page.locator("h1")).to_contain_text(CHAT)
    expect(page.locator(".conditions").first).to_contain_text("Serving requests")
    expect(page.locator("pre.command").first).to_contain_text("vllm serve Qwen/Qwen3-14B")
    expect(page.locator("#model table tbody tr")).to_have_count(2, timeout=30000)
    expect(page.locator("#log")).to_contain_text("cxygpt_sim", timeout=20000)
    expect(page.locator(".timeline")).to_contain_text("Available True")
    shoot(page, shots, "model")


def test_the_gpus_page_names_nodes_and_models(page, dev, shots):
    from playwright.sync_api import expect
    page.goto("/gpus")
    expect(page.locator("table.gpus tbody tr")).to_have_count(3)
    expect(page.locator("table.gpus")).to_contain_text("NVIDIA-H100-80GB-HBM3")
    expect(page.locator("table.gpus")).to_contain_text(f"default/{FLOOD}")
    shoot(page, shots, "gpus")


def test_the_playground_streams_an_answer(page, dev, shots):
    from playwright.sync_api import expect
    page.goto("/playground")
    page.select_option("#model", CHAT)
    # the settings drawer by keyboard: it opens on Enter with the focus inside, Escape closes it and gives it back
    page.focus("#settings-toggle")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "api-key"
    assert page.get_attribute("#settings-toggle", "aria-expanded") == "true"
    page.fill("#system-prompt", "You are terse.")
    page.fill("#max-tokens", "40")
    page.keyboard.press("Escape")
    assert page.locator("#settings").is_hidden() and page.evaluate("document.activeElement.id") == "settings-toggle"
    page.fill("#prompt", "How does the gateway protect the engines?")
    expect(page.locator("#token-count")).to_have_text(re.compile(r"^\d+ of 16128 input tokens$"), timeout=10000)
    page.click("#send")
    # the answer grows in the page while it streams (40 ms per token here): several lengths are seen
    seen = set()

    def growing():
        seen.add(page.evaluate("(document.querySelector('.msg.assistant .text') || {}).textContent?.length || 0"))
        return page.locator("#chat-status").text_content() == "Answer complete."
    wait_until(growing, timeout=30, interval=0.02, what="the answer to complete")
    assert len(seen - {0}) >= 3, f"the answer did not arrive in pieces: lengths seen {sorted(seen)}"
    answer = page.locator(".msg.assistant .text").text_content()
    assert answer
    # the conversation lives in this browser only
    stored = json.loads(page.evaluate("localStorage.getItem('cxygpt.conversations')"))
    assert stored[0]["messages"][-1] == {"role": "assistant", "content": answer}
    shoot(page, shots, "playground")


def test_a_too_long_prompt_shows_what_the_413_means(page, dev, shots):
    from playwright.sync_api import expect
    page.goto("/playground")
    page.select_option("#model", CHAT)
    long_prompt = "tokens " * 20000
    page.fill("#prompt", long_prompt)
    expect(page.locator("#token-count")).to_contain_text("over the limit of 16128 by", timeout=15000)
    counted = int(re.match(r"(\d+) input tokens", page.locator("#token-count").text_content()).group(1))
    page.click("#send")
    refusal = page.locator("#refusal")
    expect(refusal).to_contain_text("Too long for this model", timeout=15000)
    # the gateway's own count and limit, and by how much
    reply = httpx.post(dev.gateway + "/v1/chat/completions", timeout=30,
                       json={"model": CHAT, "messages": [{"role": "user", "content": long_prompt}]})
    assert reply.status_code == 413
    gateway_count = int(re.search(r"input is (\d+) tokens", reply.json()["error"]["message"]).group(1))
    assert gateway_count == counted
    expect(refusal).to_contain_text(f"is {gateway_count} tokens and the model takes at most 16128: "
                                    f"shorten it by {gateway_count - 16128} tokens")
    shoot(page, shots, "playground-413")


def test_a_flood_shows_the_429_countdown(page, dev, shots):
    from playwright.sync_api import expect
    # the model's tokens-per-minute budget (60k for DEV_32G) used up by long prompts, at the 5 requests a second
    # it admits: after that every request is refused until the minute's window frees tokens
    # (each request reserves its input plus max_tokens: long prompts first, then short ones until even a short one
    # does not fit, so the playground's request, which may use more, is refused too)
    client = openai.OpenAI(base_url=dev.gateway + "/v1", api_key="none", max_retries=0, timeout=30)
    used, deadline = 0, time.monotonic() + 90
    for prompt in ("flood " * 3500, "flood " * 20):
        while time.monotonic() < deadline:
            try:
                reply = client.chat.completions.create(model=FLOOD, max_tokens=1,
                                                       messages=[{"role": "user", "content": prompt}])
                used += reply.usage.total_tokens
            except openai.RateLimitError as e:
                if "tokens per minute" in str(e):
                    break
                time.sleep(0.25)
        else:
            pytest.fail(f"the flood did not reach the tokens-per-minute limit ({used} tokens used)")
    # the requests-per-second window of the flood's last requests passes first: the playground's refusal is then
    # the minute's (a fast page could otherwise meet the per-second limit and its 1 s)
    time.sleep(1.2)
    page.goto("/playground")
    page.select_option("#model", FLOOD)
    page.fill("#prompt", "Are you there?")
    page.click("#send")
    countdown = page.locator("#refusal .countdown")
    expect(page.locator("#refusal")).to_contain_text("Rate limited", timeout=15000)
    expect(countdown).to_have_text(re.compile(r"^Retry in \d+ s\.$"))
    first = int(re.search(r"\d+", countdown.text_content()).group())
    assert first > 2, f"a tokens-per-minute refusal waits for the window: {first} s"
    assert page.locator("#send").is_disabled()
    shoot(page, shots, "playground-429")
    # it counts down, a second at a time
    wait_until(lambda: int(re.search(r"\d+", countdown.text_content()).group()) <= first - 2, timeout=10,
               what="the countdown to go down")
