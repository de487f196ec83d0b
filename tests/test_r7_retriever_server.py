"""`mars search --serve` under hostile and heavy clients (R7), and its Search-R1 protocol.

Every server here is real (RetrieverServer over a BM25 index) on 127.0.0.1, port 0; the
bounds are made small (a 1 s request timeout, 8 connections) so the tests stay short.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clirun import Ran
from fakeservers import FakeServer, retriever_routes
from mars_cli.errors import ToolError
from mars_cli.tools.index_text import TextIndex, build_text_index, parse_passage
from mars_cli.tools.retriever_server import RetrieverServer
from mars_cli.tools.text_search import open_text_search

pytestmark = pytest.mark.network
ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"id": f"d{i}", "contents": f'"Topic {i}"\nword{i} is a passage about subject {i % 7} ' + "filler words " * 20}
        for i in range(200)]


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("r7") / "idx"
    build_text_index([parse_passage(r, None) for r in ROWS], out)
    return out


@pytest.fixture
def server(index_dir):
    srv = RetrieverServer(TextIndex(index_dir), port=0, max_connections=8, request_timeout=1.0, idle_timeout=1.0)
    srv.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def post(srv, body: bytes, conn=None):
    """(status, parsed body) of one POST /retrieve."""
    host, port = srv.server_address[:2]
    conn = conn or http.client.HTTPConnection(host, port, timeout=30)
    conn.request("POST", "/retrieve", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, json.loads(r.read())


def request(query: str, k: int = 3) -> bytes:
    return json.dumps({"queries": [query], "topk": k, "return_scores": True}).encode()


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (an EOF, perhaps after a 408)."""
    sock.settimeout(30)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


@pytest.mark.parametrize("body", [
    b"[" * 100_000,
    b'{"a":' * 50_000,
    b'{"queries": ["x"], "topk": ' + b"7" * 5000 + b"}",
    b'{"queries": ["x"], "topk": 1e999}',
    b'{"queries": ["x"], "topk": -1}',
    b'{"queries": [1]}',
    b"\xff\xfe",
], ids=["deep-list", "deep-object", "5000-digits", "inf-topk", "negative-topk", "not-strings", "not-utf8"])
def test_r7_bad_json_is_a_400_with_one_line_and_the_connection_lives(server, body, capfd):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    status, err = post(server, body, conn)
    assert status == 400 and "\n" not in err["error"], err
    status, ok = post(server, request("word3"), conn)  # the same kept-alive connection still answers
    assert status == 200 and ok["result"][0][0]["document"]["id"] == "d3"
    assert "Traceback" not in capfd.readouterr().err


def test_r7_half_sent_posts_are_cut_off_and_threads_stay_bounded(server):
    before = threading.active_count()
    socks, peak = [], 0
    for _ in range(30):
        s = socket.create_connection(server.server_address[:2])
        s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b'{"queries": ["wo')
        socks.append(s)
        peak = max(peak, threading.active_count() - before)
    # Eight connections at a time hold a thread, each for the 1 s request timeout at most;
    # the rest wait in the listen backlog and get their turn.
    for s in socks:
        assert closed_by_server(s)
        peak = max(peak, threading.active_count() - before)
        s.close()
    assert peak <= 8
    assert post(server, request("word5"))[0] == 200


def test_r7_a_trickling_request_is_cut_at_the_request_deadline_not_per_read(server):
    s = socket.create_connection(server.server_address[:2])
    head = b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    sent = 0
    try:
        for byte in head + b" " * 1000:  # one byte every 0.1 s: each read is quick, the request never ends
            s.sendall(bytes([byte]))
            sent += 1
            time.sleep(0.1)
    except (BrokenPipeError, ConnectionResetError):
        pass
    else:
        pytest.fail("the server kept reading a request that never ended")
    finally:
        s.close()
    assert sent < 100  # about 1 s of bytes (the request timeout), far from the 1,060 the client had


def test_r7_50_concurrent_clients_repeating_queries_get_every_answer_right(index_dir):
    """50 clients × 4 requests, each on a new connection and all at once: no resets (the
    listen backlog was 5), and every answer is the one a lone client gets."""
    srv = RetrieverServer(TextIndex(index_dir), port=0)
    srv.start()
    try:
        queries = [f"word{i} subject" for i in range(10)]
        expected = {q: post(srv, request(q))[1] for q in queries}
        barrier = threading.Barrier(50)
        got, errors, lock = [], [], threading.Lock()

        def client(c):
            barrier.wait()
            for j in range(4):
                q = queries[(c + j) % len(queries)]
                try:
                    host, port = srv.server_address[:2]
                    conn = http.client.HTTPConnection(host, port, timeout=60)
                    conn.request("POST", "/retrieve", request(q), {"Connection": "close"})
                    r = conn.getresponse()
                    body = json.loads(r.read())
                    conn.close()
                    with lock:
                        got.append((q, r.status, body))
                except OSError as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=client, args=(c,)) for c in range(50)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        srv.shutdown()
        srv.server_close()
    assert errors == []
    assert len(got) == 200 and all(status == 200 and body == expected[q] for q, status, body in got)
    assert sorted(q for q, _, _ in got) == sorted(queries[(c + j) % 10] for c in range(50) for j in range(4))


def test_r7_the_served_command_prints_no_traceback_for_early_disconnects_or_bad_json(index_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "mars_cli", "search", "--serve", "--index", str(index_dir), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        ready = json.loads(p.stdout.readline())
        host, port = ready["url"].split("//")[1].split("/")[0].split(":")
        big = json.dumps({"queries": [f"word{i} subject filler" for i in range(500)], "topk": 100}).encode()
        for _ in range(10):  # ask for megabytes, then reset the connection before reading any
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        for body in (b"[" * 100_000, b'{"queries": ["x"], "topk": ' + b"9" * 5000 + b"}"):
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            conn.request("POST", "/retrieve", body)
            assert conn.getresponse().status == 400
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("POST", "/retrieve", big)
        r = conn.getresponse()
        assert r.status == 200 and len(json.loads(r.read())["result"]) == 500
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Error" not in err, err


def test_r7_retriever_url_may_name_the_route_as_the_man_page_does(server):
    """`--retriever-url http://…/retrieve` (Search-R1's own form) and the base both work."""
    for url in (server.url + "/retrieve", server.url + "/retrieve/", server.url):
        r = Ran(["search", "-b", "retriever", "--retriever-url", url, "-k", "2", "word7 subject"])
        assert r.exit_code == 0, r.stderr
        assert [json.loads(x)["doc_id"] for x in r.stdout.splitlines()][0] == "d7"


def test_r7_a_retriever_url_that_404s_is_named_in_the_error():
    with FakeServer(retriever_routes([{"id": "1", "contents": "x"}])) as srv:
        base = srv.url.replace("http://", "http://user:hunter2@")
        ts = open_text_search("retriever", retriever_url=base + "/api", backoff=0.001, retries=0)
        with pytest.raises(ToolError) as e:
            ts.search("q")
        with_query = open_text_search("retriever", retriever_url=srv.url + "?token=abc", backoff=0.001, retries=0)
        assert with_query.search("q")[0]["text"] == "x"
        assert srv.calls[-1]["path"] == "/retrieve" and srv.calls[-1]["query"] == {"token": ["abc"]}
    msg = str(e.value)
    assert f"{srv.url}/api/retrieve" in msg and "HTTP 404" in msg and "hunter2" not in msg


def test_search_r1_protocol_topk_0_is_the_default_and_documents_carry_title_and_text(index_dir):
    srv = RetrieverServer(TextIndex(index_dir), port=0, default_k=4)
    srv.start()
    try:
        for body in ({"queries": ["word9 subject"], "topk": 0}, {"queries": ["word9 subject"], "topk": None},
                     {"queries": ["word9 subject"]}):
            status, res = post(srv, json.dumps(body).encode())
            assert status == 200 and len(res["result"][0]) == 4, body
        doc = res["result"][0][0]
        assert doc["id"] == "d9" and doc["title"] == "Topic 9" and doc["text"].startswith("word9 is a passage")
        # Search-R1's BM25 server: the title is the first line of contents, unquoted; the text the rest
        head, _, rest = doc["contents"].partition("\n")
        assert head.strip('"') == doc["title"] and rest == doc["text"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_r7_ctrl_c_while_a_request_thread_starts_stops_the_server_and_frees_the_slot_once(index_dir, monkeypatch):
    """A Ctrl-C that lands inside Thread.start (the request's thread already running) must
    reach the serve loop as KeyboardInterrupt. Releasing the connection slot twice raised
    ValueError there instead, which the server logged and kept serving (seen as a
    `mars search --serve` that ignored Ctrl-C under load)."""
    srv = RetrieverServer(TextIndex(index_dir), port=0, max_connections=2)
    real_start = threading.Thread.start

    def start_then_interrupted(self):
        real_start(self)
        if self.name.startswith("Thread") and threading.current_thread() is threading.main_thread():
            self.join(5)  # the request's thread ran to its end and released its slot
            raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start_then_interrupted)
    try:
        host, port = srv.server_address[:2]
        client = socket.create_connection((host, port))
        client.sendall(request("paris"))
        client.shutdown(socket.SHUT_WR)  # one request: its thread ends when answered
        with pytest.raises(KeyboardInterrupt):
            srv.handle_request()
        client.close()
        # both slots free: a double release would have raised, a missing one would block
        assert srv._slots.acquire(timeout=1) and srv._slots.acquire(timeout=1)
    finally:
        monkeypatch.undo()
        srv.server_close()
