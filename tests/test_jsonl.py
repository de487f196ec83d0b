"""Record streams: the reading rules, atomic writes, NaN refusal."""

import io
import math
import sys

import orjson
import pytest

from mars_cli import jsonl
from mars_cli.errors import MarsError, RecordError


def write(tmp_path, data: bytes, name="in.jsonl"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_reads_objects_with_locations(tmp_path):
    p = write(tmp_path, b'{"a": 1}\n{"a": 2}\n')
    got = list(jsonl.read_located([p]))
    assert [r["a"] for _, r in got] == [1, 2]
    assert [str(w) for w, _ in got] == [f"{p}:1", f"{p}:2"]


def test_blank_lines_are_skipped_but_counted_for_line_numbers(tmp_path):
    p = write(tmp_path, b'{"a": 1}\n\n   \n{"a": 2}\n')
    got = list(jsonl.read_located([p]))
    assert [w.line for w, _ in got] == [1, 4]


def test_bom_is_dropped(tmp_path):
    p = write(tmp_path, b'\xef\xbb\xbf{"a": 1}\n')
    assert list(jsonl.read_records([p])) == [{"a": 1}]


def test_missing_final_newline_is_fine(tmp_path):
    p = write(tmp_path, b'{"a": 1}\n{"a": 2}')
    assert [r["a"] for r in jsonl.read_records([p])] == [1, 2]


def test_truncated_last_line_is_named(tmp_path):
    p = write(tmp_path, b'{"a": 1}\n{"a": 2, "b": [1, 2')
    with pytest.raises(RecordError) as e:
        list(jsonl.read_records([p]))
    assert e.value.line == 2
    assert "truncated last line" in str(e.value)
    assert str(p) in str(e.value)


def test_invalid_json_in_the_middle(tmp_path):
    p = write(tmp_path, b'{"a": 1}\n{nope}\n{"a": 3}\n')
    with pytest.raises(RecordError) as e:
        list(jsonl.read_records([p]))
    assert e.value.line == 2 and "invalid JSON" in str(e.value)


@pytest.mark.parametrize("pad", [0, 10_000])  # a short line and one past the vectorized count's threshold
def test_a_record_too_deep_to_write_back_is_refused_where_it_is_read(tmp_path, pad):
    # orjson reads 1024 levels but writes only 254: the stage would fail at its writer instead.
    ok = {"x": "y" * pad, "a": orjson.loads("[" * 200 + "]" * 200), "many": [{} for _ in range(400)],
          "brackets": "[{" * 400}
    p = write(tmp_path, orjson.dumps(ok) + b"\n" + orjson.dumps({"x": "y" * pad}) + b"\n"
              + b'{"x": "' + b"y" * pad + b'", "a": ' + b"[" * 300 + b"]" * 300 + b"}\n")
    with pytest.raises(RecordError) as e:
        list(jsonl.read_records([p]))
    assert e.value.line == 3 and "nested too deeply to be written back" in str(e.value)
    got = list(jsonl.read_records([p], skip_bad=True))
    assert got[0] == ok and len(got) == 2


def test_write_extended_is_write_byte_for_byte_on_a_record_mars_wrote(tmp_path):
    rec = {"schema_version": 1, "id": "q/1", "messages": [{"role": "user", "content": "é ✓ \u2028"}],
           "tokens": {"ids": [1, 2, 3], "logprobs": [-0.5, -1e-7, 0.0]}, "reward": 0.25, "meta": {}}
    fields = {"advantage": -1.5, "advantage_stats": {"n": 3, "std": 0.1}, "batch": {"id": "b", "size": 2}}
    src = write(tmp_path, jsonl.dumps(rec) + b"{}\n" + b' { "a" : 1 }  \n')
    read = list(jsonl.read_located([src], with_text=True))
    assert [r for _, r, _ in read] == [rec, {}, {"a": 1}]
    for i, (_, r, text) in enumerate(read):
        a, b = tmp_path / f"a{i}.jsonl", tmp_path / f"b{i}.jsonl"
        with jsonl.RecordWriter(a) as w:
            w.write({**r, **fields})
        with jsonl.RecordWriter(b) as w:
            w.write_extended(text, fields)
        if i == 0:
            assert a.read_bytes() == b.read_bytes()  # the line mars writes, nothing re-serialized
        else:  # other spellings keep theirs (write also stamps the schema version)
            assert orjson.loads(b.read_bytes()) == {**r, **fields}
            assert orjson.loads(a.read_bytes()) == {"schema_version": 1, **r, **fields}
    with jsonl.RecordWriter(tmp_path / "nan.jsonl") as w, pytest.raises(MarsError, match="non-finite.*advantage"):
        w.write_extended(read[0][2], {"advantage": math.nan})


def test_non_object_is_an_error(tmp_path):
    p = write(tmp_path, b'[1, 2]\n')
    with pytest.raises(RecordError, match="expected a JSON object, got list"):
        list(jsonl.read_records([p]))


def test_nan_literal_in_input_is_invalid(tmp_path):
    p = write(tmp_path, b'{"a": NaN}\n')
    with pytest.raises(RecordError, match="invalid JSON"):
        list(jsonl.read_records([p]))


def test_skip_bad_warns_and_counts(tmp_path, capsys):
    p = write(tmp_path, b'{"a": 1}\n{bad\n7\n{"a": 4}\n{"a": 5}')
    got = list(jsonl.read_records([p], skip_bad=True))
    assert [r["a"] for r in got] == [1, 4, 5]
    err = capsys.readouterr().err
    assert f"{p}:2: skipped: invalid JSON" in err
    assert f"{p}:3: skipped: expected a JSON object" in err
    assert "skipped 2 bad lines" in err


def test_missing_file(tmp_path):
    with pytest.raises(MarsError, match="no such file"):
        list(jsonl.read_records([tmp_path / "nope.jsonl"]))


def test_several_files_in_order(tmp_path):
    a = write(tmp_path, b'{"n": 1}\n', "a.jsonl")
    b = write(tmp_path, b'{"n": 2}\n', "b.jsonl")
    assert [r["n"] for r in jsonl.read_records([a, b])] == [1, 2]


def test_writer_refuses_nan_and_inf(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(MarsError, match="non-finite"):
        with jsonl.RecordWriter(out) as w:
            w.write({"ok": 1.0})
            w.write({"x": {"y": [1.0, math.inf]}})
    assert not out.exists()  # nothing half-written
    assert list(tmp_path.iterdir()) == []  # and no temp file left


def test_writer_checks_only_fresh_fields(tmp_path):
    out = tmp_path / "out.jsonl"
    with jsonl.RecordWriter(out) as w:
        w.write({"old": [0.5] * 3, "new": 1.0}, fresh=["new"])
        with pytest.raises(MarsError, match="new"):
            w.write({"new": float("nan")}, fresh=["new"])
    assert orjson.loads(out.read_bytes().splitlines()[0])["new"] == 1.0


def test_writer_atomic_replace_and_schema_version(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    with jsonl.RecordWriter(out) as w:
        w.write({"a": 1})
        assert out.read_text() == "old\n"  # not replaced until complete
    lines = out.read_bytes().splitlines()
    assert orjson.loads(lines[0]) == {"schema_version": 1, "a": 1}


def test_writer_keeps_field_order_and_unknown_fields(tmp_path):
    out = tmp_path / "out.jsonl"
    rec = {"schema_version": 1, "z": 1, "unknown": {"deep": [1, 2]}, "a": "x"}
    with jsonl.RecordWriter(out) as w:
        w.write(rec)
    assert out.read_bytes() == orjson.dumps(rec) + b"\n"


def test_writer_to_missing_directory(tmp_path):
    with pytest.raises(MarsError, match="does not exist"):
        jsonl.RecordWriter(tmp_path / "no" / "out.jsonl")


def test_stdin_is_read_when_no_file(monkeypatch):
    fake = io.TextIOWrapper(io.BytesIO(b'{"a": 1}\n'))
    monkeypatch.setattr(sys, "stdin", fake)
    assert list(jsonl.read_records(None)) == [{"a": 1}]


def test_writer_to_a_device_writes_through_without_replacing_it(tmp_path):
    import os
    import stat

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    import threading

    got = []
    t = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()))
    t.start()
    with jsonl.RecordWriter(fifo) as w:
        w.write({"a": 1})
    t.join(5)
    assert got == [b'{"schema_version":1,"a":1}\n']
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a pipe, not a regular file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


def test_output_file_gets_the_usual_permissions(tmp_path):
    import os

    out = tmp_path / "out.jsonl"
    old = os.umask(0o022)
    try:
        with jsonl.RecordWriter(out) as w:
            w.write({"a": 1})
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o644


def test_minor_line_longer_than_the_bound_is_named_not_held(tmp_path, monkeypatch, capsys):
    """A 2 GB line used to be read whole (6 GB RSS) and then called invalid JSON."""
    monkeypatch.setenv("MARS_MAX_LINE_BYTES", "1000")
    exact = b'{"x":"' + b"a" * (1000 - 8) + b'"}\n'  # 1000 bytes before its newline: within the bound
    assert len(exact) == 1001
    long = b'{"x":"' + b"b" * 5_000_000 + b'"}\n'
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a":1}\n' + exact + long + b'{"a":4}\n' + b'{"y":"' + b"c" * 3000)  # the last unterminated
    with pytest.raises(RecordError, match=r"a.jsonl:3: line longer than 1,000 bytes \(MARS_MAX_LINE_BYTES\)"):
        list(jsonl.read_located([p]))
    got = [(w.line, r) for w, r in jsonl.read_located([p], skip_bad=True)]
    assert [ln for ln, _ in got] == [1, 2, 4] and got[2][1] == {"a": 4}
    err = capsys.readouterr().err
    assert "a.jsonl:3: skipped: line longer than 1,000 bytes" in err and "a.jsonl:5: skipped: line longer" in err

    class Counting(io.BufferedReader):
        largest = 0

        def readline(self, size=-1):
            out = super().readline(size)
            Counting.largest = max(Counting.largest, len(out))
            return out

    lines = list(jsonl._lines(Counting(io.BytesIO(long * 3)), 1000))
    assert lines == [None, None, None] and Counting.largest <= 1 << 20  # never more than a piece at a time


def test_minor_bad_line_bound_is_a_usage_error(tmp_path, monkeypatch):
    from mars_cli.errors import UsageError

    monkeypatch.setenv("MARS_MAX_LINE_BYTES", "-5")
    (tmp_path / "a.jsonl").write_text('{"a": 1}\n')
    with pytest.raises(UsageError, match="MARS_MAX_LINE_BYTES must be an integer >= 1, got '-5'"):
        list(jsonl.read_located([tmp_path / "a.jsonl"]))
