"""MLLM judges: a model asked short questions about images, for mask selection and answer grading.

A judge is anything with ``name`` and ``ask(images, prompt, *, system=None) -> str``. Backends:

- ``openai``: any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, SGLang, a proxy),
  through the standard library only. Images travel as base64 PNG data URLs, all in one user
  message after the text, as the published GPT-4o selection did. The key comes from
  ``OPENAI_API_KEY`` and never appears in logs, ``repr`` or exception messages. 429 and 5xx
  answers, timeouts and dropped connections are retried with exponential backoff (``Retry-After``
  honoured), a bounded number of times.
- ``hf``: a local transformers MLLM through a model adapter's ``chat(image, prompt, max_new_tokens)``.
  Such adapters take one image, so several images are composed into one grid of numbered tiles
  (numbers 1..N in reading order, matching the "Answer with a number from 1 to N" question).

``make_judge("openai:MODEL" | "hf:MODEL" | "none")`` builds one from the ``--judge`` flag.
"""
from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import logging
import math
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

from PIL import Image, ImageDraw, ImageFont

from pixfound.errors import JudgeError, UserError
from pixfound.eval.prompts import JUDGE_SYSTEM_PROMPT, judge_prompt

__all__ = [
    "Judge",
    "JudgeError",
    "JudgeAuthError",
    "JudgeHTTPError",
    "JudgeResponseError",
    "JudgeTimeoutError",
    "OpenAIJudge",
    "HFJudge",
    "make_judge",
    "judge_answer",
    "compose_numbered_grid",
    "JUDGE_SYSTEM",
]

logger = logging.getLogger("pixfound.judge")

# System message of the published GPT-4o mask selection (pixmmvp/inference/infer_pixfoundation_auto_gpt.py);
# protocol-1 grading uses prompts.JUDGE_SYSTEM_PROMPT, the same sentence plus "Please answer in only yes or no."
JUDGE_SYSTEM = "You are a helpful and precise assistant for checking the quality of the answer."

RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class JudgeAuthError(JudgeError):
    """The endpoint refused the credentials (HTTP 401/403)."""


class JudgeHTTPError(JudgeError):
    """The endpoint answered with an HTTP error (after retries where the status is transient)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class JudgeResponseError(JudgeError):
    """The endpoint answered 2xx with a body that is not a chat-completions JSON."""


class JudgeTimeoutError(JudgeError):
    """Every attempt timed out or lost its connection."""


@runtime_checkable
class Judge(Protocol):
    """An MLLM that answers a text prompt about zero or more images."""

    name: str

    def ask(self, images: Sequence[Image.Image], prompt: str, *, system: Optional[str] = None) -> str:
        """The model's reply text to ``prompt`` shown with ``images`` (in order)."""
        ...


# --------------------------------------------------------------------------- answer grading


def judge_answer(judge: Judge, question: str, correct_answer: str, response: str, *,
                 rules: str = "pixfound") -> Optional[bool]:
    """Ask ``judge`` whether a free-form ``response`` answers ``question`` correctly (protocol 1).

    Returns ``None`` when the reply is neither yes nor no (:func:`pixfound.eval.metrics.parse_judge_verdict`);
    the published script counted that as wrong, and callers should do the same while recording it.
    """
    from pixfound.eval.metrics import parse_judge_verdict

    reply = judge.ask([], judge_prompt(question, correct_answer, response), system=JUDGE_SYSTEM_PROMPT)
    return parse_judge_verdict(reply, rules=rules)


# --------------------------------------------------------------------------- image helpers


def encode_image_data_url(image: Image.Image, *, max_side: Optional[int] = None) -> str:
    """PNG data URL of ``image``, downscaled (aspect kept) so that its longer side is at most ``max_side``."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"images must be PIL.Image objects, got {type(image).__name__}")
    image = image.convert("RGB")
    if max_side is not None and max(image.size) > max_side:
        scale = max_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def compose_numbered_grid(images: Sequence[Image.Image], *, tile_side: int = 336, columns: Optional[int] = None) -> Image.Image:
    """One image showing ``images`` as tiles numbered 1..N in reading order (left to right, top to bottom).

    Each tile keeps its aspect ratio inside a ``tile_side`` square and carries its number in a
    white box at the top-left corner, so a one-image model can answer "a number from 1 to N".
    """
    if len(images) == 0:
        raise ValueError("compose_numbered_grid needs at least one image, got 0")
    count = len(images)
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    gap = max(2, tile_side // 64)
    grid = Image.new("RGB", (columns * tile_side + (columns + 1) * gap, rows * tile_side + (rows + 1) * gap), "black")
    font = _label_font(max(12, tile_side // 10))
    draw = ImageDraw.Draw(grid)
    for number, image in enumerate(images, start=1):
        tile = image.convert("RGB")
        tile.thumbnail((tile_side, tile_side), Image.Resampling.BILINEAR)
        row, col = divmod(number - 1, columns)
        x0 = gap + col * (tile_side + gap)
        y0 = gap + row * (tile_side + gap)
        grid.paste(tile, (x0 + (tile_side - tile.width) // 2, y0 + (tile_side - tile.height) // 2))
        label = str(number)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
        pad = max(2, tile_side // 80)
        draw.rectangle([x0, y0, x0 + right - left + 2 * pad, y0 + bottom - top + 2 * pad], fill="white")
        draw.text((x0 + pad - left, y0 + pad - top), label, fill="black", font=font)
    return grid


def _label_font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


# --------------------------------------------------------------------------- openai backend


def _retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); ``None`` if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIJudge:
    """A judge behind an OpenAI-compatible chat-completions endpoint (standard library HTTP only).

    Args:
        model: model name sent in the request (``gpt-4o`` as published).
        base_url: API root; ``/chat/completions`` is appended. Defaults to ``$OPENAI_BASE_URL`` or OpenAI.
        api_key: the key; defaults to ``$OPENAI_API_KEY``. Required for api.openai.com, optional for
            local servers. Kept private: not in ``repr``, logs or error messages.
        timeout: seconds per request.
        max_attempts: total tries for transient failures (429, 5xx, timeouts, dropped connections).
        backoff: first retry delay in seconds; doubles each retry, capped at ``max_backoff``.
            A ``Retry-After`` header replaces the computed delay (also capped).
        temperature: sampling temperature (0.2 in the published scripts).
        max_tokens: reply length cap sent to the server (``None``: not sent, the server's default, as published).
        image_max_side: images larger than this are downscaled before upload (``None``: never).
        sleep: the function that waits between retries (tests pass a recorder).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: Optional[str] = None,
        api_key: Optional[str] = None,
        timeout: float = 60.0,
        max_attempts: int = 6,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        temperature: float = 0.2,
        max_tokens: Optional[int] = None,
        image_max_side: Optional[int] = 1024,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not model:
            raise UserError("OpenAIJudge needs a model name, e.g. openai:gpt-4o")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1").rstrip("/")
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise UserError(f"judge base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, got {base_url!r}")
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        if not key and parsed.hostname == "api.openai.com":
            raise UserError("the OpenAI judge needs an API key: set the OPENAI_API_KEY environment variable")
        self.model = model
        self.base_url = base_url
        self.url = base_url + "/chat/completions"
        self.timeout = float(timeout)
        self.max_attempts = int(max_attempts)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.temperature = float(temperature)
        self.max_tokens = max_tokens
        self.image_max_side = image_max_side
        self._sleep = sleep
        self.__key = key or None
        self.name = f"openai:{model}"

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, key={'set' if self.__key else 'unset'})"

    def config(self) -> dict:
        """Settings to record with results (no secrets)."""
        return {
            "backend": "openai",
            "model": self.model,
            "base_url": self.base_url,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "timeout": self.timeout,
            "max_attempts": self.max_attempts,
            "image_max_side": self.image_max_side,
        }

    def _redact(self, text: str) -> str:
        # Servers sometimes echo (part of) the key in error bodies; scrub it before it reaches any message.
        if self.__key:
            text = text.replace(self.__key, "***")
        return text

    def _payload(self, images: Sequence[Image.Image], prompt: str, system: Optional[str]) -> bytes:
        if images:
            content: Any = [{"type": "text", "text": prompt}] + [
                {"type": "image_url", "image_url": {"url": encode_image_data_url(image, max_side=self.image_max_side)}}
                for image in images
            ]
        else:
            content = prompt
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {"model": self.model, "messages": messages, "temperature": self.temperature}
        if self.max_tokens is not None:
            body["max_tokens"] = int(self.max_tokens)
        return json.dumps(body).encode("utf-8")

    def _delay(self, attempt: int, retry_after: Optional[float]) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff)
        return min(self.backoff * (2 ** (attempt - 1)), self.max_backoff)

    def ask(self, images: Sequence[Image.Image], prompt: str, *, system: Optional[str] = None) -> str:
        """Send one chat-completions request and return the reply text (see class docs for retries)."""
        data = self._payload(list(images), prompt, system if system is not None else JUDGE_SYSTEM)
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.__key:
            headers["Authorization"] = "Bearer " + self.__key
        last_problem = ""
        final_status: Optional[int] = None
        for attempt in range(1, self.max_attempts + 1):
            request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            retry_after: Optional[float] = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                return self._parse_reply(raw)
            except urllib.error.HTTPError as err:
                status = err.code
                detail = self._error_detail(err)
                if status in (401, 403):
                    raise JudgeAuthError(
                        f"judge endpoint {self.url} refused the credentials (HTTP {status}{detail}); "
                        "check OPENAI_API_KEY and --judge-base-url"
                    ) from None
                if status not in RETRY_STATUSES and not 500 <= status < 600:
                    raise JudgeHTTPError(
                        f"judge endpoint {self.url} answered HTTP {status}{detail} for model {self.model!r}", status
                    ) from None
                retry_after = _retry_after_seconds(err.headers.get("Retry-After") if err.headers else None)
                last_problem = f"HTTP {status}{detail}"
                final_status = status
            except (TimeoutError, socket.timeout) as err:
                last_problem = f"timed out after {self.timeout:g} s ({type(err).__name__})"
                final_status = None
            except urllib.error.URLError as err:
                reason = err.reason
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    last_problem = f"timed out after {self.timeout:g} s"
                else:
                    last_problem = f"connection failed: {self._redact(str(reason))}"
                final_status = None
            except (ConnectionError, http.client.HTTPException) as err:
                # A server that closes mid-reply raises e.g. RemoteDisconnected.
                last_problem = f"connection failed: {type(err).__name__}: {self._redact(str(err))}"
                final_status = None
            if attempt == self.max_attempts:
                break
            delay = self._delay(attempt, retry_after)
            logger.warning(
                "judge request to %s failed (%s); retry %d/%d in %.2f s",
                self.url, last_problem, attempt, self.max_attempts - 1, delay,
            )
            self._sleep(delay)
        message = f"judge endpoint {self.url} failed after {self.max_attempts} attempt(s): {last_problem}"
        if final_status is not None:
            raise JudgeHTTPError(message, final_status)
        raise JudgeTimeoutError(message)

    def _error_detail(self, err: urllib.error.HTTPError) -> str:
        try:
            body = err.read(4096).decode("utf-8", "replace")
        except Exception:  # the body only decorates the message
            body = ""
        finally:
            err.close()
        text = ""
        try:
            parsed = json.loads(body)
            error = parsed.get("error") if isinstance(parsed, dict) else None
            if isinstance(error, dict):
                text = str(error.get("message", ""))
            elif isinstance(error, str):
                text = error
        except ValueError:
            text = body
        text = self._redact(" ".join(text.split()))[:200]
        return f": {text}" if text else ""

    def _parse_reply(self, raw: bytes) -> str:
        snippet = self._redact(raw[:200].decode("utf-8", "replace"))
        try:
            parsed = json.loads(raw)
        except ValueError:
            raise JudgeResponseError(f"judge endpoint {self.url} returned a body that is not JSON: {snippet!r}") from None
        try:
            content = parsed["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise JudgeResponseError(
                f"judge endpoint {self.url} returned JSON without choices[0].message.content: {snippet!r}"
            ) from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if content is None:
            return ""
        if not isinstance(content, str):
            raise JudgeResponseError(f"judge endpoint {self.url} returned non-text content: {snippet!r}")
        return content


# --------------------------------------------------------------------------- hf backend


class HFJudge:
    """A judge that is a local MLLM behind a pixfound model adapter.

    The adapter must provide ``chat(image, prompt, max_new_tokens) -> str`` with ``image`` a
    ``PIL.Image`` or ``None`` (text-only questions such as protocol-1 grading). Several images
    are shown as one numbered grid (``compose_numbered_grid``), and the prompt is prefixed with a
    sentence saying so. The ``system`` message is not sent: adapters use their model's own template.
    """

    def __init__(self, adapter: Any, *, name: Optional[str] = None, max_new_tokens: int = 32, tile_side: int = 336):
        if not callable(getattr(adapter, "chat", None)):
            raise ValueError(
                f"the hf judge needs a model adapter with chat(image, prompt, max_new_tokens); "
                f"{type(adapter).__name__} has none"
            )
        self.adapter = adapter
        self.max_new_tokens = int(max_new_tokens)
        self.tile_side = int(tile_side)
        self.name = name or f"hf:{getattr(adapter, 'name', type(adapter).__name__)}"

    def __repr__(self) -> str:
        return f"HFJudge({self.name!r})"

    def config(self) -> dict:
        """Settings to record with results."""
        return {"backend": "hf", "name": self.name, "max_new_tokens": self.max_new_tokens, "tile_side": self.tile_side}

    def ask(self, images: Sequence[Image.Image], prompt: str, *, system: Optional[str] = None) -> str:
        """Reply of the local model; several images become one grid of numbered tiles."""
        images = list(images)
        if not images:
            image = None
        elif len(images) == 1:
            image = images[0]
        else:
            image = compose_numbered_grid(images, tile_side=self.tile_side)
            prompt = f"The picture shows {len(images)} images as tiles numbered 1 to {len(images)}. {prompt}"
        reply = self.adapter.chat(image, prompt, self.max_new_tokens)
        if not isinstance(reply, str):
            raise JudgeResponseError(f"{self.name}: adapter.chat returned {type(reply).__name__}, expected str")
        return reply


# --------------------------------------------------------------------------- factory


def make_judge(
    spec: Optional[str],
    *,
    base_url: Optional[str] = None,
    adapter: Any = None,
    **options: Any,
) -> Optional[Judge]:
    """Judge from a ``--judge`` value: ``"openai:MODEL"``, ``"hf:MODEL"`` or ``"none"`` (returns ``None``).

    ``base_url`` goes to the openai backend (``--judge-base-url``); ``options`` go to the
    backend's constructor. For ``hf``, ``adapter`` reuses an already loaded model adapter (e.g.
    the evaluated model) instead of loading ``MODEL`` with ``pixfound.models.load_model``.
    """
    if spec is None or spec.strip().lower() in ("", "none"):
        return None
    backend, sep, model = spec.strip().partition(":")
    backend = backend.lower()
    if not sep or not model.strip():
        raise UserError(f"--judge {spec!r}: expected openai:MODEL, hf:MODEL or none")
    model = model.strip()
    if backend == "openai":
        return OpenAIJudge(model, base_url=base_url, **options)
    if backend == "hf":
        if adapter is None:
            from pixfound.models import load_model

            adapter = load_model(model)
        return HFJudge(adapter, name=f"hf:{model}", **options)
    raise UserError(f"--judge {spec!r}: unknown backend {backend!r}; expected openai:MODEL, hf:MODEL or none")
