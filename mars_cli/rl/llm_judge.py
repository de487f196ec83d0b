"""The LLM judge: rubric prompts, verdict parsing, an async client and a SQLite cache.

Any OpenAI-compatible server works (a vLLM server, a hosted API): we POST to
`{base_url}/chat/completions` with httpx.AsyncClient, at most `concurrency` requests in
flight, each with a timeout and retried with exponential backoff on connection errors,
timeouts, 429 and 5xx. The API key is only sent as a header: it never reaches a record,
a log line or a cache key.

Rubrics, each with its own prompt version (recorded in every judged record, and part
of the cache key, so editing a prompt never reuses stale verdicts):
- `sensenova` (the default): the official judge of SenseNova-MARS (inference/eval.py and
  verl/utils/reward_score/tool.py): a lenient 13-rule Yes/No rubric that sees the image,
  asked once per gold answer (the first Yes wins, so the score is the max over golds). A
  reply without a `<judge>Yes</judge>` tag counts as No, as there; a call that fails after
  its retries scores 0 and is counted against the judge's health (`Verdict.failed`);
- `strict`: mars's strict yes/no equivalence check over all golds at once, answered as
  `<verdict>yes</verdict>` (`binary` is its former name);
- `simpleqa`: correct / incorrect / not attempted, answered as `<grade>…</grade>`.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from mars_cli.errors import MarsError

BINARY_VERSION = "binary-v1"
SIMPLEQA_VERSION = "simpleqa-v1"

BINARY_RUBRIC = """You grade answers to questions about images. Decide whether the candidate answer means the same as one of the reference answers. Be strict.

Rules:
- The candidate must name the same thing as a reference, at least as specifically: "a bird" does not match "a kingfisher", and a vaguer or partial answer is wrong.
- Extra details are fine only if they are correct and do not change what is answered; extra claims that contradict a reference, or a list of several candidates, make the answer wrong.
- Numbers must agree in value; a missing unit is fine when the reference's unit is obvious, a different unit must convert to the same quantity; rounding is fine only to the precision the question asks for.
- Names of people, places, works and organisations must refer to the same entity; spelling variants, aliases and translations of the same name are fine.
- Dates must agree to the precision the reference gives.
- For yes/no questions the candidate must give the same polarity as the reference.
- For multiple-choice questions the candidate must pick the same option (by its letter or its text).
- Judge only the candidate's final answer, not its reasoning. Ignore formatting, case and punctuation.

Reply with one word inside the tag, and nothing else: <verdict>yes</verdict> if the candidate is correct, <verdict>no</verdict> otherwise."""

SIMPLEQA_RUBRIC = """You grade answers to factual questions against reference answers. Put the candidate answer into one of three grades.

- correct: it contains the information of a reference answer fully and does not contradict it. Hedging is fine if one definite answer is given and it is right. Small spelling differences in names are fine; numbers must match to the precision of the reference.
- incorrect: it states an answer that contradicts the references or is not fully right, including answers that list several candidates, one of them right.
- not_attempted: it gives no definite answer (it refuses, says it does not know, or asks for more information) and does not contradict the references.

Reply with the grade inside the tag and nothing else: <grade>correct</grade>, <grade>incorrect</grade> or <grade>not_attempted</grade>."""

# The official judge's texts, verbatim (eval.py's LLM_JUDGE_SYSTEM_PROMPT / _USER_PROMPT).
SENSENOVA_VERSION = "sensenova-v1"
SENSENOVA_SYSTEM = """You are an AI assistant tasked with evaluating the correctness of model responses based on an image, question, and ground truth answer. Your judgment should follow these principles:

1. Consider the image, question, and ground truth answer holistically before evaluating the model's response.
2. Your decision should be strictly Yes or No, based on whether the model's response is factually accurate and aligns with the ground truth answer.
3. If the model response is a more specific form of the ground truth answer, it is correct.
4. If the model response includes all key information but adds minor details, it is correct as long as the extra details are factually correct.
5. If the model response contradicts, modifies, or omits critical parts of the answer, it is incorrect.
6. For numerical values, ensure correctness even when presented in different units.
7. For names, check for first and last name correctness. If the middle name is extra but correct, consider it correct.
8. For yes/no questions, the response must exactly match "Yes" or "No" to be correct.
9. If the judgment can be made based solely on the text, you may choose to ignore the input image, as some images may be unfamiliar to you and could affect your judgment. Refer to the image only when necessary to minimize misjudgment.
10. If there are multiple candidate answers, you can also evaluate the model's response against all of them. If the response aligns with at least one candidate according to the rules above, it should be considered correct.
11. For multiple choice questions (A, B, C, D), be more lenient. If the model provides the correct letter choice, even with additional text or formatting, consider it correct.
12. If the model's answer contains the correct choice letter (A, B, C, or D) anywhere in the response, and it's clear this is the intended answer, mark it as correct.
13. Ignore formatting issues like extra parentheses, brackets, or minor text variations as long as the core answer is correct.

Your output must be in the following format:
<judge>Yes/No</judge>
<reason>Explanation of why the answer is correct or incorrect.</reason>"""
SENSENOVA_USER = """Image, Question, and Model Response Evaluation
Question: {question}
Ground Truth Answer: {ground_truth}
Model Response: {model_response}

Evaluation Instructions
Evaluate whether the Model Response is correct based on the Image, Question and Ground Truth Answer. Follow the predefined judgment rules and provide a clear Yes/No answer along with a justification.

Output Format
<judge>Yes/No</judge>
<reason>Detailed reasoning following the evaluation principles.</reason>"""

RUBRICS = {"sensenova": (SENSENOVA_VERSION, SENSENOVA_SYSTEM), "strict": (BINARY_VERSION, BINARY_RUBRIC),
           "simpleqa": (SIMPLEQA_VERSION, SIMPLEQA_RUBRIC)}
ALIASES = {"binary": "strict"}
_JUDGE_TAG = re.compile(r"<judge>\s*(Yes|No)\s*</judge>", re.IGNORECASE | re.DOTALL)
_VERDICT = re.compile(r"<verdict>\s*(yes|no)\s*</verdict>", re.IGNORECASE)
_GRADE = re.compile(r"<grade>\s*(correct|incorrect|not[ _]attempted)\s*</grade>", re.IGNORECASE)
_JSON = {"Content-Type": "application/json"}
# The image is shrunk before it is sent: a judge needs the gist, not 8k pixels.
JUDGE_IMAGE_SIDE = 1024
MAX_REPLY_BYTES = 1 << 20  # a verdict is a few hundred bytes; a larger reply is an error, not read on


def rubric_name(rubric: str) -> str:
    return ALIASES.get(rubric, rubric)


def prompt_version(rubric: str) -> str:
    rubric = rubric_name(rubric)
    if rubric not in RUBRICS:
        raise MarsError(f"unknown rubric {rubric!r} (choose {', '.join(RUBRICS)})")
    return RUBRICS[rubric][0]


def build_messages(question: str, golds: list[str], prediction: str, *, rubric: str = "strict", image_url: str | None = None) -> list[dict]:
    """The chat sent to the judge: the rubric as system text, the case as user text.

    sensenova: one gold per call (golds[0]); the text first, then the image, as eval.py.
    """
    rubric = rubric_name(rubric)
    prompt_version(rubric)
    if rubric == "sensenova":
        text = SENSENOVA_USER.format(question=question, ground_truth=golds[0], model_response=prediction)
        user_s: list[dict] | str = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": image_url}}] \
            if image_url else text
        return [{"role": "system", "content": SENSENOVA_SYSTEM}, {"role": "user", "content": user_s}]
    refs = "\n".join(f"- {g}" for g in golds)
    case = f"Question:\n{question}\n\nReference answers (any one is correct):\n{refs}\n\nCandidate answer:\n{prediction}"
    user: list[dict] | str = case
    if image_url:
        user = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": case}]
    return [{"role": "system", "content": RUBRICS[rubric][1]}, {"role": "user", "content": user}]


def parse_verdict(raw: str, rubric: str = "strict") -> tuple[str | None, float | None]:
    """(verdict, accuracy) from the judge's text; (None, None) when no tag is found.

    The LAST tag counts: a reasoning model may quote the format before answering.
    sensenova reads as the official code does: the first <judge> tag; no tag means "no".
    """
    rubric = rubric_name(rubric)
    if rubric == "sensenova":
        m = _JUDGE_TAG.search(raw or "")
        return ("yes", 1.0) if m and m.group(1).lower() == "yes" else ("no", 0.0)
    rx = _VERDICT if rubric == "strict" else _GRADE
    found = rx.findall(raw or "")
    if not found:
        return None, None
    v = found[-1].lower().replace(" ", "_")
    return v, float(v in ("yes", "correct"))


def image_data_url(path: str) -> str:
    """A JPEG data URL of an image, its long side at most JUDGE_IMAGE_SIDE pixels."""
    from mars_cli.images import thumbnail_jpeg

    # The bounded reader: mars's pixel limit (not Pillow's lower one), regular files only.
    data = thumbnail_jpeg(path, JUDGE_IMAGE_SIDE, quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def official_image_data_url(path: str, decode: str | None = None) -> str:
    """The image as the official judge receives it: resized by the official smart_resize
    (65,536–8,294,400 pixels, factor 32, bicubic), then JPEG quality 85."""
    from PIL import Image

    from mars_cli import images, sensenova

    arr = images.load_array(path, decode=decode)  # mars's bounded reader (EXIF applied unless "stored")
    h, w = sensenova.smart_resize(arr.shape[0], arr.shape[1])
    if (h, w) != arr.shape[:2]:
        import numpy as np

        arr = np.asarray(Image.fromarray(arr).resize((w, h), Image.Resampling.BICUBIC))
    return "data:image/jpeg;base64," + base64.b64encode(images.encode(arr, "JPEG", quality=85)).decode()


def cache_key(model: str, version: str, question: str, golds: list[str], prediction: str, image: str | None = None) -> str:
    blob = json.dumps([model, version, question, list(golds), prediction, image], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


class VerdictCache:
    """Judge verdicts in SQLite (`DIR/judge.sqlite`): re-judging the same case is free."""

    def __init__(self, directory: str | Path):
        d = Path(directory).expanduser()
        try:
            d.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(d / "judge.sqlite", check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, verdict TEXT, raw TEXT)")
        except (OSError, sqlite3.Error) as e:
            raise MarsError(f"{d}: cannot open judge cache: {e}") from None
        self._lock = threading.Lock()
        self.hits = 0

    def get(self, key: str) -> tuple[str, str] | None:
        with self._lock:
            row = self._db.execute("SELECT verdict, raw FROM verdicts WHERE key = ?", (key,)).fetchone()
        if row:
            self.hits += 1
        return row

    def put(self, key: str, verdict: str, raw: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?)", (key, verdict, raw))

    def close(self) -> None:
        self._db.close()


@dataclass
class Verdict:
    """One judge result: `accuracy` is None when the judge could not be asked or read."""

    accuracy: float | None
    verdict: str | None
    raw: str | None
    error: str | None = None
    cached: bool = False
    calls: int = 0  # requests sent (not cached)
    failed: int = 0  # requests that failed after their retries


class AsyncJudge:
    """An OpenAI-compatible chat endpoint used as a grader; call `judge` from a running loop."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        rubric: str = "sensenova",
        concurrency: int = 32,
        timeout: float = 60.0,
        retries: int = 3,
        backoff: float = 0.5,
        max_tokens: int = 512,
        cache: VerdictCache | None = None,
    ):
        from mars_cli.urls import join, split_credentials

        base_url, basic = split_credentials(base_url)  # user:password@ → a header, never logged
        self.url = join(base_url, "/chat/completions")
        self.model = model
        self.rubric = rubric_name(rubric)
        prompt_version(rubric)  # an unknown rubric fails here, before any call
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self.max_tokens = max_tokens
        self.cache = cache
        self.concurrency = concurrency
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if basic and not api_key:
            self._headers = {"Authorization": basic}
        self._clients: list = []
        self._free: asyncio.Queue | None = None

    async def __aenter__(self) -> "AsyncJudge":
        import ssl

        import httpx

        # One client per slot, each with a single keep-alive connection: httpcore scans its
        # whole pool on every request event, which with one 32-connection pool cost ~3 ms
        # of CPU per call — as much as the calls themselves at 150 calls/s. A free-list of
        # clients is also the concurrency limit. The TLS context is built once and shared.
        tls = ssl.create_default_context()
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self._free = asyncio.Queue()
        for _ in range(self.concurrency):
            client = httpx.AsyncClient(timeout=self.timeout, limits=limits, headers=self._headers, verify=tls)
            self._clients.append(client)
            self._free.put_nowait(client)
        return self

    async def __aexit__(self, *exc) -> None:
        for client in self._clients:
            await client.aclose()

    async def judge(self, question: str, golds: list[str], prediction: str, *, image: str | None = None,
                    rubric: str | None = None, max_tokens: int | None = None, decode: str | None = None) -> Verdict:
        """Grade one answer; never raises for a failed call (the Verdict carries the error).

        `max_tokens` overrides the judge's (a profile's call); `decode` is the image decode mode.
        """
        rubric = rubric_name(rubric or self.rubric)
        if rubric == "sensenova":
            return await self._judge_each_gold(question, golds, prediction, image, max_tokens or self.max_tokens, decode)
        key = cache_key(self.model, prompt_version(rubric), question, golds, prediction, image)
        if self.cache is not None and (hit := self.cache.get(key)):
            _, acc = parse_verdict(hit[1], rubric)
            return Verdict(acc, hit[0], hit[1], cached=True)
        url = image
        if image and not image.startswith(("http://", "https://", "data:")):
            try:
                url = await asyncio.to_thread(image_data_url, image)
            except MarsError as e:
                return Verdict(None, None, None, error=str(e))
        body = {
            "model": self.model,
            "messages": build_messages(question, golds, prediction, rubric=rubric, image_url=url),
            "temperature": 0.0,
            "max_tokens": max_tokens or self.max_tokens,
        }
        client = await self._free.get()
        try:
            raw, error = await self._post(client, body)
        finally:
            self._free.put_nowait(client)
        if raw is None:
            return Verdict(None, None, None, error=error, calls=1, failed=1)
        verdict, acc = parse_verdict(raw, rubric)
        if verdict is None:
            return Verdict(None, None, raw, error="judge reply has no verdict tag", calls=1)
        if self.cache is not None:
            self.cache.put(key, verdict, raw)
        return Verdict(acc, verdict, raw, calls=1)

    async def _judge_each_gold(self, question: str, golds: list[str], prediction: str, image: str | None,
                               max_tokens: int, decode: str | None = None) -> Verdict:
        """The official judge: one call per gold until one says Yes; a failed call scores 0."""
        url = image
        if image and not image.startswith(("http://", "https://", "data:")):
            try:
                url = await asyncio.to_thread(official_image_data_url, image, decode)
            except MarsError as e:
                return Verdict(None, None, None, error=str(e))
        calls = failed = 0
        errors: list[str] = []
        cached_all = True
        last_raw = None
        for gold in golds:
            key = cache_key(self.model, SENSENOVA_VERSION, question, [gold], prediction, image)
            hit = self.cache.get(key) if self.cache is not None else None
            if hit:
                raw = hit[1]
            else:
                cached_all = False
                body = {"model": self.model, "temperature": 0.0, "max_tokens": max_tokens,
                        "messages": build_messages(question, [gold], prediction, rubric="sensenova", image_url=url)}
                client = await self._free.get()
                try:
                    raw, error = await self._post(client, body)
                finally:
                    self._free.put_nowait(client)
                calls += 1
                if raw is None:
                    failed += 1
                    errors.append(error)
                    continue
                if self.cache is not None:
                    self.cache.put(key, parse_verdict(raw, "sensenova")[0], raw)
            last_raw = raw
            if parse_verdict(raw, "sensenova")[1] == 1.0:
                return Verdict(1.0, "yes", raw, cached=cached_all, calls=calls, failed=failed,
                               error="; ".join(errors) or None)
        return Verdict(0.0, "no", last_raw, error="; ".join(errors) or None, cached=cached_all and not calls,
                       calls=calls, failed=failed)

    async def _post(self, client, body: dict) -> tuple[str | None, str | None]:
        import httpx

        payload = json.dumps(body, ensure_ascii=False).encode()
        error = "no attempt"
        wait_hint = 0.0
        for attempt in range(self.retries + 1):
            if attempt:
                # Full jitter: many concurrent retries should not hit the server in step.
                # A server's Retry-After (seconds, capped) is a floor.
                await asyncio.sleep(max(wait_hint, random.uniform(0, self.backoff * 2 ** (attempt - 1))))
            try:
                # The whole exchange has one deadline (a server trickling bytes does not
                # reset it) and the body is read up to MAX_REPLY_BYTES only.
                status, headers, data = await asyncio.wait_for(self._exchange(client, payload), self.timeout)
            except (httpx.TimeoutException, asyncio.TimeoutError):
                error = f"judge timed out after {self.timeout:g}s"
                continue
            except httpx.HTTPError as e:
                error = f"judge request failed: {type(e).__name__}: {e}"
                continue
            if data is None:
                return None, f"judge reply is over {MAX_REPLY_BYTES} bytes"
            if status == 429 or status >= 500:
                error = f"judge returned HTTP {status}"
                wait_hint = _retry_after(headers.get("retry-after"))
                continue
            if status != 200:
                return None, f"judge returned HTTP {status}: {data[:200].decode('utf-8', 'replace')}"
            try:
                content = json.loads(data)["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                return None, "judge reply is not an OpenAI chat completion"
            if content is not None and not isinstance(content, str):
                return None, "judge reply content is not a string"
            return (content or ""), None
        return None, f"{error} ({self.retries + 1} attempts)"


    async def _exchange(self, client, payload: bytes) -> tuple[int, dict, bytes | None]:
        """(status, headers, body) of one POST; body None when over MAX_REPLY_BYTES."""
        async with client.stream("POST", self.url, content=payload, headers=_JSON) as resp:
            chunks, size = [], 0
            async for chunk in resp.aiter_bytes():
                size += len(chunk)
                if size > MAX_REPLY_BYTES:
                    return resp.status_code, dict(resp.headers), None
                chunks.append(chunk)
            return resp.status_code, dict(resp.headers), b"".join(chunks)


def _retry_after(value: str | None, cap: float = 30.0) -> float:
    """Seconds from a Retry-After header (the seconds form; dates are ignored), capped."""
    try:
        return min(max(float(value), 0.0), cap) if value else 0.0
    except ValueError:
        return 0.0
