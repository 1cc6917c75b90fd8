"""`tunelab serve`'s HTTP API through the official `openai` client against a live server (uvicorn
on a loopback port, in a thread): shapes, exact greedy outputs and token counts, streaming, errors."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

import tunelab
from helpers import tiny_run_config, write_records_data
from peft_oracle import fresh_base
from tunelab.generation import generate
from tunelab.models.tiny import tiny_tokenizer
from tunelab.runs import load_run
from tunelab.serve.adapters import MultiLoraLinear
from tunelab.serve.app import ServerSettings, build_engine, create_app

BASE, KEY = "tiny-random-llama", "secret-key"


@contextmanager
def live_server(engine, settings):
    """uvicorn serving the app on a free loopback port, in a thread; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    live = uvicorn.Server(uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=live.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not live.started:  # uvicorn's own flag: set once the socket listens
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        live.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(module_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-api")
    train_file, _ = write_records_data(folder, n_train=8)
    runs = {}
    for seed, name in enumerate(("a", "b", "c")):
        config = tiny_run_config(folder / "adapters" / name, train_file, method={"r": 4, "alpha": 8.0, "target": "all-linear"}, train={"max_steps": 3, "lr": 3e-2, "seed": seed})
        runs[name] = tunelab.train(config).output_dir
    settings = ServerSettings(base_name=BASE, api_key=KEY, adapter_dir=folder / "adapters", max_batch=4, max_queue=8, max_model_len=256)
    engine = build_engine(settings, {"a": str(runs["a"]), "b": str(runs["b"])}, device="cpu")
    with live_server(engine, settings) as url:
        yield {"url": url, "runs": runs, "engine": engine}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)


def alone(server, name, prompt, max_tokens):
    run = load_run(server["runs"][name])
    return generate(run.model, run.tokenizer, [prompt], max_new_tokens=max_tokens)[0]


def test_models_lists_the_base_and_its_adapters(client):
    models = {m.id: m for m in client.models.list().data}
    assert sorted(models) == sorted([BASE, "a", "b"])
    assert models["a"].model_extra["parent"] == BASE and models[BASE].model_extra["parent"] is None


def test_greedy_completion_equals_generating_alone_with_exact_usage(server, client):
    prompt = "Name: Ana Silva, 31"
    reply = client.completions.create(model="a", prompt=prompt, max_tokens=12, temperature=0)
    assert reply.choices[0].text.strip() == alone(server, "a", prompt, 12)  # generate() strips its answers
    assert reply.usage.prompt_tokens == len(tiny_tokenizer()(prompt)["input_ids"])
    assert 1 <= reply.usage.completion_tokens <= 12 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_chat_completion_streams_the_same_answer_with_usage_last(server, client):
    messages = [{"role": "user", "content": "Extract: Ana, 31, Porto"}]
    whole = client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0)
    assert whole.choices[0].message.content.strip() == alone(server, "b", messages, 10)
    chunks = list(client.chat.completions.create(model="b", messages=messages, max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason


def test_errors_are_openai_errors_with_their_status(server, client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256 tokens; the prompt has 3\\d\\d tokens"):
        client.completions.create(model=BASE, prompt="x" * 300, max_tokens=2)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body, expected in ((b"{not json", "not valid JSON"), (b'{"model": "a", "prompt": "hi", "max_tokens": "many"}', "max_tokens")):
        response = httpx.post(server["url"] + "/v1/completions", content=body, headers=headers)
        assert response.status_code == 400 and expected in response.json()["error"]["message"]
    for body, expected in (({"prompt": ""}, "the prompt is empty"), ({"prompt": "hi", "stop": ""}, "stop"), ({"prompt": "hi", "seed": 2**64}, "seed")):
        response = httpx.post(server["url"] + "/v1/completions", json={"model": "a", **body}, headers=headers)
        assert response.status_code == 400 and expected in response.json()["error"]["message"], response.text
    tiny = client.completions.create(model="a", prompt="Order 7", max_tokens=4, temperature=1e-45)  # would overflow the logits: sampled as greedy
    assert tiny.choices[0].text == client.completions.create(model="a", prompt="Order 7", max_tokens=4, temperature=0).choices[0].text
    missing = httpx.post(server["url"] + "/v1/embeddings", json={}, headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "POST /v1/embeddings: Not Found"
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    assert 'tunelab_requests_total{status="404"}' in httpx.get(server["url"] + "/metrics").text


def test_adapters_load_and_unload_from_the_adapter_dir_only(server, client):
    headers = {"Authorization": f"Bearer {KEY}"}
    url = server["url"] + "/v1"
    outside = httpx.post(url + "/load_lora_adapter", json={"lora_name": "x", "lora_path": "../../etc"}, headers=headers)
    assert outside.status_code == 400 and "outside --adapter-dir" in outside.json()["error"]["message"]
    loaded = httpx.post(url + "/load_lora_adapter", json={"lora_name": "c", "lora_path": "c"}, headers=headers)
    assert loaded.status_code == 200, loaded.text
    prompt = "Order 7"
    assert client.completions.create(model="c", prompt=prompt, max_tokens=8, temperature=0).choices[0].text.strip() == alone(server, "c", prompt, 8)
    assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "c"}, headers=headers).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="c", prompt=prompt, max_tokens=2)


def metric(url: str, sample: str) -> float:
    """One sample's value from /metrics (0 when it has not been recorded)."""
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def wait_until(condition, what: str, seconds: float = 30):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def test_concurrent_requests_share_batches_and_each_equals_generating_alone(server, client):
    jobs = [
        ("a", "Name: Ana Silva, 31"),
        ("b", "Order 7"),
        (BASE, "Hi there"),
        ("a", "x"),
        ("b", "A longer prompt than the others, by a few tokens"),
        ("a", "Order 7"),
        (BASE, "x"),
        ("b", "Name: Rui"),
    ]  # the queue's size: none refused
    steps_before = metric(server["url"], "tunelab_batch_size_count")
    rows_before = metric(server["url"], "tunelab_batch_size_sum")
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: client.completions.create(model=job[0], prompt=job[1], max_tokens=10, temperature=0).choices[0].text, jobs))
    for (name, prompt), answer in zip(jobs, answers):
        model = load_run(server["runs"][name]).model if name != BASE else fresh_base()
        assert answer.strip() == generate(model, tiny_tokenizer(), [prompt], max_new_tokens=10)[0], (name, prompt)
    steps = metric(server["url"], "tunelab_batch_size_count") - steps_before
    rows = metric(server["url"], "tunelab_batch_size_sum") - rows_before
    assert rows / steps > 1.5  # requests really shared decoding steps


def test_a_client_that_leaves_mid_stream_frees_its_row_and_the_server_goes_on(server, client):
    cancelled = 'tunelab_sequences_total{finish_reason="cancelled"}'
    before = metric(server["url"], cancelled)
    body = {"model": "a", "prompt": "Name: Ana", "max_tokens": 240, "temperature": 0, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert next(response.iter_lines()).startswith("data: {")
    # the connection is closed after the first event
    wait_until(lambda: metric(server["url"], cancelled) > before, "the server cancelled the abandoned sequence")
    wait_until(lambda: not server["engine"].running, "the batch emptied")
    assert client.completions.create(model="b", prompt="Hi", max_tokens=3).usage.completion_tokens >= 1


def test_a_megabyte_prompt_and_max_tokens_past_the_context_are_400_naming_both_lengths(server, client):
    with pytest.raises(openai.BadRequestError, match=r"maximum context length is 256 tokens; the prompt has \d{6,} tokens"):
        client.completions.create(model="a", prompt="word " * 200_000, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match=r"256 tokens; the prompt has \d+ tokens and max_tokens asks for 100000 more"):
        client.chat.completions.create(model="b", messages=[{"role": "user", "content": "Hi"}], max_tokens=100_000)
    assert client.completions.create(model="a", prompt="Hi", max_tokens=2).choices[0].text is not None


def test_a_burst_past_max_queue_gets_429s_then_all_admitted_requests_finish_and_the_batch_empties(server, client):
    engine = server["engine"]

    def send(_):
        try:
            return client.completions.create(model="b", prompt="Order 7", max_tokens=8).usage.completion_tokens and 200
        except openai.APIStatusError as err:
            assert err.status_code != 429 or "queue is full" in err.message
            return err.status_code

    with ThreadPoolExecutor(12) as pool:
        with engine.model_lock:  # the engine cannot take anything off the queue meanwhile
            results = [pool.submit(send, i) for i in range(12)]
            wait_until(lambda: sum(r.done() for r in results) == 4 and len(engine.waiting) == 8, "the queue filled and the rest were refused")
        statuses = sorted(r.result() for r in results)
    assert statuses == [200] * 8 + [429] * 4
    wait_until(lambda: not engine.running and engine.cache is None and not engine.waiting, "the engine let go of the burst's rows and cache")


def test_adapters_load_and_unload_while_traffic_flows(server, client):
    headers, url = {"Authorization": f"Bearer {KEY}"}, server["url"] + "/v1"
    expected = {name: alone(server, name, "Order 7", 6) for name in ("a", "b")}
    stop, results = threading.Event(), []

    def traffic(name):
        while not stop.is_set():
            try:
                text = client.completions.create(model=name, prompt="Order 7", max_tokens=6, temperature=0).choices[0].text
                results.append((name, 200, text.strip()))
            except openai.APIStatusError as err:
                results.append((name, err.status_code, None))

    workers = [threading.Thread(target=traffic, args=(name,)) for name in ("a", "b", "c")]
    for worker in workers:
        worker.start()
    try:
        for _ in range(4):
            assert httpx.post(url + "/load_lora_adapter", json={"lora_name": "c", "lora_path": "c"}, headers=headers).status_code == 200
            assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "c"}, headers=headers).status_code == 200
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    assert {(name, status, text) for name, status, text in results if name != "c"} == {("a", 200, expected["a"]), ("b", 200, expected["b"])}
    assert {status for name, status, _ in results if name == "c"} <= {200, 404}
    wait_until(lambda: not server["engine"].running, "the batch emptied")
    with server["engine"].model_lock:  # the step that emptied it has ended
        assert all(len(m.updates) <= 2 for m in server["engine"].model.modules() if isinstance(m, MultiLoraLinear))  # c's weights went each time


def test_the_playground_page_streams_two_models_side_by_side_in_a_real_browser(server, client, tmp_path):
    """Debian's headless Chromium, driven by selenium: the page loads, takes the API key, sends one
    prompt to the base and an adapter, and shows both streamed answers with token counts; the
    screenshot is kept in $TUNELAB_ARTIFACTS (default test-artifacts/)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert browser and driver_path, "the browser test needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,800", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(server["url"] + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.ID, "reload"))  # /v1/models refused: no key yet
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        driver.find_element(By.ID, "reload").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#models input")) == 3)
        assert [box.is_selected() for box in driver.find_elements(By.CSS_SELECTOR, "#models input")] == [True, False, False]  # the base
        driver.find_element(By.CSS_SELECTOR, "#models input[value='a']").click()
        prompt = "Extract: Ana, 31, Porto"
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        max_tokens = driver.find_element(By.ID, "max-tokens")
        max_tokens.clear()
        max_tokens.send_keys("12")
        driver.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".answer[data-done='true']")) == 2)
        artifacts = Path(os.environ.get("TUNELAB_ARTIFACTS", "test-artifacts"))
        artifacts.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(artifacts / "playground.png"))
        panels = {panel.get_attribute("data-model"): panel for panel in driver.find_elements(By.CSS_SELECTOR, ".answer")}
        assert sorted(panels) == sorted([BASE, "a"])
        assert panels["a"].find_element(By.TAG_NAME, "pre").get_attribute("textContent").strip()  # something streamed in
        for name, panel in panels.items():
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0)
            assert panel.find_element(By.TAG_NAME, "pre").get_attribute("textContent") == reply.choices[0].message.content
            assert f"{reply.usage.completion_tokens} completion tokens" in panel.find_element(By.CLASS_NAME, "stats").text
    finally:
        driver.quit()
    assert (artifacts / "playground.png").stat().st_size > 10_000


def test_stop_strings_end_the_text_before_them_streamed_or_not(client):
    whole = client.completions.create(model="b", prompt="Name: Ana Silva, 31", max_tokens=16, temperature=0).choices[0].text
    assert len(whole) >= 4, whole
    stop = whole[2:4]
    expected = whole[: whole.find(stop)]
    reply = client.completions.create(model="b", prompt="Name: Ana Silva, 31", max_tokens=16, temperature=0, stop=[stop, "never appears"])
    assert (reply.choices[0].text, reply.choices[0].finish_reason) == (expected, "stop")
    chunks = list(client.completions.create(model="b", prompt="Name: Ana Silva, 31", max_tokens=16, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_n_seeded_samples_repeat_exactly_and_count_every_token(client):
    def sample():
        return client.completions.create(model=BASE, prompt="Order 7", max_tokens=8, temperature=1.5, n=3, seed=5)

    first, again = sample(), sample()
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices] and len(set(texts)) > 1
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.finish_reason for c in first.choices] == ["length"] * 3 and first.usage.completion_tokens == 3 * 8  # each choice's tokens, the prompt once
    assert first.usage.prompt_tokens == len(tiny_tokenizer()("Order 7")["input_ids"])


def test_a_failed_generation_is_a_500_error_json_and_the_server_goes_on(server, client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel failure")

    monkeypatch.setattr(server["engine"].model, "forward", broken)
    with pytest.raises(openai.InternalServerError, match="generation error: RuntimeError: kernel failure"):
        client.completions.create(model="a", prompt="Hi", max_tokens=3)
    monkeypatch.undo()
    assert client.completions.create(model="a", prompt="Hi", max_tokens=3).usage.completion_tokens >= 1
