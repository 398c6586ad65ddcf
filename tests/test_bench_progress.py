"""``mmsink bench`` says up front what it will run, gives an estimate after the baseline row and a line
per row as it finishes (stderr); its table and JSON are what they were."""

import json
import re

from test_bench import NARROW

from mmsink.tools import bench


def test_a_line_per_row_and_an_estimate(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(bench.SHAPES, "tiny-cpu", NARROW)
    argv = ["--shape", "tiny-cpu", "--device", "cpu", "--reps", "1", "--methods", "fastv"]
    argv += ["--budgets", "64", "--decode-tokens", "1", "--out", str(tmp_path), "--name", "b"]
    res = bench.main(argv)
    out, err = capsys.readouterr()
    lines = err.splitlines()
    first = [i for i, x in enumerate(lines) if x.startswith("bench tiny-cpu: 2 rows")]
    rows = [x for x in lines if re.match(r"\[\d/2\] ", x)]
    assert first and first[0] < lines.index(rows[0])
    assert [x.split(":")[0] for x in rows] == ["[1/2] baseline", "[2/2] fastv 64"]
    assert all(re.search(r"\d+ s so far, about \d+ s left\)$", x) for x in rows)
    # the outputs as before: the table on stdout, the JSON and Markdown files
    assert out == bench.measured_markdown(res) + "\n"
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(res))
    assert [r["method"] for r in res["rows"]] == ["baseline", "fastv"]
    assert "progress" not in res and not any("left" in json.dumps(r) for r in res["rows"])
