"""`tunelab serve`'s HTTP API through the official `openai` client against a live server (uvicorn
on a loopback port, in a thread): shapes, exact greedy outputs and token counts, streaming, errors."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import openai
import pytest
import uvicorn

import tunelab
from helpers import tiny_run_config, write_records_data
from tunelab.generation import generate
from tunelab.models.tiny import tiny_tokenizer
from tunelab.runs import load_run
from tunelab.serve.app import ServerSettings, build_engine, create_app

BASE, KEY = "tiny-random-llama", "secret-key"


@pytest.fixture(scope="module")
def server(module_cache, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-api")
    train_file, _ = write_records_data(folder, n_train=8)
    runs = {}
    for seed, name in enumerate(("a", "b", "c")):
        config = tiny_run_config(folder / "adapters" / name, train_file, method={"r": 4, "alpha": 8.0, "target": "all-linear"}, train={"max_steps": 3, "lr": 3e-2, "seed": seed})
        runs[name] = tunelab.train(config).output_dir
    settings = ServerSettings(base_name=BASE, api_key=KEY, adapter_dir=folder / "adapters", max_model_len=256)
    engine = build_engine(settings, {"a": str(runs["a"]), "b": str(runs["b"])}, device="cpu")
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
    yield {"url": f"http://127.0.0.1:{port}", "runs": runs, "engine": engine}
    live.should_exit = True
    thread.join(timeout=30)


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
