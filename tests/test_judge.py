"""The MLLM judge: the openai backend against a real loopback HTTP server, the hf backend with a
fake adapter, the factory, protocol-1 answer grading, and judge-based mask selection end to end."""
from __future__ import annotations

import base64
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from fake_openai_server import FakeOpenAIServer, Reply, chat_reply, error_reply
from pixfound.eval import judge as judge_mod
from pixfound.eval.metrics import parse_judge_verdict
from pixfound.eval.judge import (
    HFJudge,
    JudgeAuthError,
    JudgeHTTPError,
    JudgeResponseError,
    JudgeTimeoutError,
    OpenAIJudge,
    compose_numbered_grid,
    judge_answer,
    make_judge,
)
from pixfound.eval.prompts import JUDGE_SYSTEM_PROMPT, judge_prompt
from pixfound.grounding.phrases import Phrase
from pixfound.grounding.select import build_candidates, choice_prompt, exists_prompt, select_judge

SECRET = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture
def server():
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return SECRET


def make_client(server: FakeOpenAIServer, delays: list, **kwargs) -> OpenAIJudge:
    options = dict(timeout=5.0, max_attempts=4, backoff=0.25, sleep=delays.append)
    options.update(kwargs)
    return OpenAIJudge("fake-model", base_url=server.base_url, **options)


def test_reply_text_and_request_shape(server, api_key):
    server.script = [chat_reply(" Yes. ")]
    delays: list = []
    client = make_client(server, delays)
    images = [Image.new("RGB", (40, 30), "blue"), Image.new("RGB", (7, 9), "green")]
    assert client.ask(images, "Is it blue?") == " Yes. "
    assert delays == []
    (request,) = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {SECRET}"
    body = request.body
    assert body["model"] == "fake-model" and body["temperature"] == pytest.approx(0.2)
    system, user = body["messages"]
    assert system["role"] == "system" and system["content"] == judge_mod.JUDGE_SYSTEM
    text, *image_parts = user["content"]
    assert text == {"type": "text", "text": "Is it blue?"}
    assert len(image_parts) == 2
    for part, original in zip(image_parts, images):
        url = part["image_url"]["url"]
        assert url.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        assert decoded.size == original.size
        assert np.array_equal(np.array(decoded.convert("RGB")), np.array(original))


def test_large_images_are_downscaled_before_upload(server, api_key):
    server.script = [chat_reply("ok")]
    client = make_client(server, [], image_max_side=64)
    client.ask([Image.new("RGB", (300, 150), "red")], "?")
    url = server.requests[0].body["messages"][1]["content"][1]["image_url"]["url"]
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (64, 32)


def test_text_only_question_sends_a_plain_string(server, api_key):
    server.script = [chat_reply("no")]
    client = make_client(server, [])
    assert client.ask([], "2+2=5?", system="custom system") == "no"
    messages = server.requests[0].body["messages"]
    assert messages == [{"role": "system", "content": "custom system"}, {"role": "user", "content": "2+2=5?"}]


def test_429_honours_retry_after_then_succeeds(server, api_key):
    server.script = [error_reply(429, "slow down", headers={"Retry-After": "7"}), chat_reply("3")]
    delays: list = []
    assert make_client(server, delays).ask([], "pick") == "3"
    assert delays == [7.0]
    assert len(server.requests) == 2


def test_retry_after_is_capped(server, api_key):
    server.script = [error_reply(503, "busy", headers={"Retry-After": "3600"}), chat_reply("ok")]
    delays: list = []
    assert make_client(server, delays, max_backoff=2.0).ask([], "q") == "ok"
    assert delays == [2.0]


def test_500_then_success_uses_exponential_backoff(server, api_key):
    server.script = [error_reply(500, "boom"), error_reply(502, "bad gateway"), chat_reply("fine")]
    delays: list = []
    assert make_client(server, delays, backoff=0.25).ask([], "q") == "fine"
    assert delays == [0.25, 0.5]
    assert len(server.requests) == 3


def test_persistent_429_stops_after_bounded_attempts(server, api_key):
    server.script = [error_reply(429, "rate limited")]
    delays: list = []
    with pytest.raises(JudgeHTTPError, match=r"after 3 attempt\(s\): HTTP 429: rate limited") as info:
        make_client(server, delays, max_attempts=3).ask([], "q")
    assert info.value.status == 429
    assert len(server.requests) == 3
    assert delays == [0.25, 0.5]


def test_401_is_a_clear_error_without_retries_and_without_the_key(server, api_key, caplog):
    # Real servers echo the offending key; it must be scrubbed from the message.
    server.script = [error_reply(401, f"Incorrect API key provided: {SECRET}")]
    caplog.set_level(logging.DEBUG)
    with pytest.raises(JudgeAuthError) as info:
        make_client(server, []).ask([], "q")
    message = str(info.value)
    assert "HTTP 401" in message and "OPENAI_API_KEY" in message and server.base_url in message
    assert SECRET not in message and "***" in message
    assert len(server.requests) == 1
    assert SECRET not in caplog.text


def test_other_4xx_is_not_retried(server, api_key):
    server.script = [error_reply(400, "image too large")]
    with pytest.raises(JudgeHTTPError, match="HTTP 400: image too large") as info:
        make_client(server, []).ask([], "q")
    assert info.value.status == 400 and len(server.requests) == 1


def test_non_json_body_is_a_clear_error(server, api_key):
    server.script = [Reply(status=200, body="<html>gateway says hi</html>")]
    with pytest.raises(JudgeResponseError, match="not JSON.*gateway says hi"):
        make_client(server, []).ask([], "q")


def test_json_without_choices_is_a_clear_error(server, api_key):
    server.script = [Reply(status=200, body={"object": "chat.completion", "choices": []})]
    with pytest.raises(JudgeResponseError, match=r"choices\[0\]\.message\.content"):
        make_client(server, []).ask([], "q")


def test_timeout_is_retried_then_reported(server, api_key):
    server.script = [Reply(body={}, delay=30.0)]  # stopping the server cuts the wait short
    delays: list = []
    with pytest.raises(JudgeTimeoutError, match=r"after 2 attempt\(s\): timed out after 0.2 s"):
        make_client(server, delays, timeout=0.2, max_attempts=2).ask([], "q")
    assert len(server.requests) == 2
    assert delays == [0.25]


def test_connection_refused_is_reported(api_key):
    import socket

    with socket.socket() as probe:  # a port that was free a moment ago and has no listener now
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = OpenAIJudge("m", base_url=f"http://127.0.0.1:{port}/v1", max_attempts=2, sleep=lambda s: None)
    with pytest.raises(JudgeTimeoutError, match="connection failed"):
        client.ask([], "q")


def test_key_never_logged_or_shown(server, api_key, caplog):
    server.script = [error_reply(429, f"limit for key {SECRET}", headers={"Retry-After": "0"}), error_reply(500, "x"),
                     Reply(status=200, body=f"not json {SECRET}")]
    caplog.set_level(logging.DEBUG)
    client = make_client(server, [])
    with pytest.raises(JudgeResponseError) as info:
        client.ask([], "q")
    assert len(caplog.records) == 2  # one warning per retry
    assert SECRET not in caplog.text
    assert SECRET not in str(info.value)
    assert SECRET not in repr(client) and SECRET not in json.dumps(client.config())
    assert all(SECRET in r.headers["authorization"] for r in server.requests)


def test_missing_key_for_openai_com_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIJudge("gpt-4o")


def test_local_server_needs_no_key(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.script = [chat_reply("yes")]
    assert OpenAIJudge("m", base_url=server.base_url).ask([], "q") == "yes"
    assert "authorization" not in server.requests[0].headers


@pytest.mark.parametrize("bad", [dict(max_attempts=0), dict(timeout=0), dict(base_url="ftp://x")])
def test_bad_settings_are_rejected(bad, api_key):
    options = dict(base_url="http://127.0.0.1:1/v1")
    options.update(bad)
    with pytest.raises(ValueError):
        OpenAIJudge("m", **options)


# --------------------------------------------------------------------------- answer grading


@pytest.mark.parametrize("reply, lenient, published", [
    ("Yes", True, True), ("yes.", True, True), ("YES.", True, True), ("yes..", True, False), (" yes", True, None),
    ("yes\n", True, False), (" NO ", False, None), ("no...", False, False), ("Yes, it does.", None, None),
    ("maybe", None, None), ("", None, None)])
def test_verdict_rules(reply, lenient, published):
    """pixfound trims and takes any trailing dots; the published scorer counted exactly "yes" and "yes."."""
    assert parse_judge_verdict(reply) is lenient
    assert parse_judge_verdict(reply, rules="published") is published

    def published_scorer(answer):  # pixmmvp/eval/protocol1_accuracy.py, as written
        import re

        if re.compile(r"^(yes|no)\.*$", re.IGNORECASE).match(answer):
            grade = answer.lower()
        else:
            grade = "Could not determine yes or no."
        return grade == "yes" or grade == "yes."

    assert bool(parse_judge_verdict(reply, rules="published")) is published_scorer(reply)


def test_judge_answer_over_http(server, api_key):
    server.script = [chat_reply("Yes"), chat_reply("No."), chat_reply("I cannot tell")]
    client = make_client(server, [])
    question = "Is the door open? (a) Open (b) Closed"
    assert judge_answer(client, question, "(a)", "The door is open.") is True
    assert judge_answer(client, question, "(a)", "It is closed.") is False
    assert judge_answer(client, question, "(a)", "Hmm") is None
    first = server.requests[0].body["messages"]
    assert first[0] == {"role": "system", "content": JUDGE_SYSTEM_PROMPT}
    assert first[1]["content"] == judge_prompt(question, "(a)", "The door is open.")
    assert first[1]["content"].startswith("Given the following question Is the door open?")
    assert first[1]["content"].endswith("answer:The door is open.? Respond with a Yes/No")


# --------------------------------------------------------------------------- hf backend and factory


class FakeAdapter:
    name = "tiny-fake"

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def chat(self, image, prompt, max_new_tokens):
        self.calls.append((image, prompt, max_new_tokens))
        return self.replies.pop(0)


def test_hf_judge_sends_one_image_or_a_numbered_grid():
    adapter = FakeAdapter(["yes", "2", "no"])
    judge = HFJudge(adapter, max_new_tokens=5, tile_side=64)
    one = Image.new("RGB", (20, 10), "red")
    assert judge.ask([one], "q1") == "yes"
    assert adapter.calls[0] == (one, "q1", 5)
    tiles = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    assert judge.ask(tiles, "Which?") == "2"
    grid, prompt, _ = adapter.calls[1]
    assert isinstance(grid, Image.Image) and prompt.endswith("Which?") and "numbered 1 to 3" in prompt
    assert judge.ask([], "text only") == "no"
    assert adapter.calls[2][0] is None


def test_numbered_grid_layout():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255)]
    tiles = [Image.new("RGB", (50, 50), c) for c in colours]
    grid = compose_numbered_grid(tiles, tile_side=50)
    gap = 2
    assert grid.size == (3 * 50 + 4 * gap, 2 * 50 + 3 * gap)  # 5 tiles -> 3 columns, 2 rows
    pixels = np.array(grid)
    for number, colour in enumerate(colours):
        row, col = divmod(number, 3)
        centre = (gap + row * (50 + gap) + 40, gap + col * (50 + gap) + 40)  # away from the label box
        assert tuple(pixels[centre]) == colour
        label_corner = (gap + row * (50 + gap) + 1, gap + col * (50 + gap) + 1)
        assert tuple(pixels[label_corner]) == (255, 255, 255)
    with pytest.raises(ValueError, match="at least one image"):
        compose_numbered_grid([])


def test_hf_judge_rejects_adapter_without_chat():
    with pytest.raises(ValueError, match="chat"):
        HFJudge(object())


def test_make_judge(server, api_key):
    assert make_judge("none") is None and make_judge(None) is None and make_judge("") is None
    client = make_judge("openai:gpt-4o", base_url=server.base_url, timeout=3.0)
    assert isinstance(client, OpenAIJudge) and client.name == "openai:gpt-4o" and client.timeout == 3.0
    local = make_judge("hf:llava-hf/llava-1.5-7b-hf", adapter=FakeAdapter([]))
    assert isinstance(local, HFJudge) and local.name == "hf:llava-hf/llava-1.5-7b-hf"
    for bad in ("openai", "openai:", "claude:x"):
        with pytest.raises(ValueError, match="--judge"):
            make_judge(bad)


# --------------------------------------------------------------------------- selection through the server


def _scene():
    image = Image.new("RGB", (12, 8), (100, 100, 100))
    rng = np.random.default_rng(3)
    masks = rng.random((2, 3, 8, 12)) > 0.5
    phrases = [Phrase(index=i, text=t, root=t.split()[-1], char_start=0, char_end=1, position_pct=10.0 * i)
               for i, t in enumerate(["a cat", "the mat"])]
    candidates = build_candidates(phrases, np.zeros((2, 1, 2), int), masks, rng.random((2, 3)))
    return image, candidates


@pytest.mark.parametrize(
    "choice, expected_index, fallback",
    [("3", 2, None), ("Image 5 shows it best.", 4, None), ("the second one", 0, "no_integer"),
     ("banana", 0, "no_integer"), ("9", 0, "out_of_range"), ("0", 0, "out_of_range")],
)
def test_select_judge_over_http(server, api_key, choice, expected_index, fallback):
    image, candidates = _scene()
    server.script = [chat_reply("Yes."), chat_reply(choice)]
    selection = select_judge(candidates, image, "the cat", make_client(server, []))
    assert selection.candidate_index == expected_index
    assert np.array_equal(selection.mask, candidates[expected_index].mask)
    assert selection.info["fallback"] == fallback
    assert selection.info["choice_reply"] == choice
    exists_request, choice_request = server.requests
    assert exists_request.body["messages"][1]["content"][0]["text"] == exists_prompt("the cat")
    assert exists_request.body["messages"][1]["content"][0]["text"] == "Does this image have the cat? Answer yes/no only."
    content = choice_request.body["messages"][1]["content"]
    assert content[0]["text"] == choice_prompt("the cat", 6)
    assert len(content) == 1 + 6  # all overlays in one message, sorted candidate order


def test_select_judge_absent_means_empty_and_one_request(server, api_key):
    image, candidates = _scene()
    server.script = [chat_reply("No.")]
    selection = select_judge(candidates, image, "a dog", make_client(server, []))
    assert selection.is_empty_prediction and not selection.mask.any()
    assert selection.info["exists"] is False and len(server.requests) == 1
