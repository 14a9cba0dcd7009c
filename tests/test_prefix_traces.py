"""Prefix-sharing traces: Mooncake-style JSONL loads, its block ids reach replay items, and equal ids replay as
equal prompt text (which is what the gateway's own prefix hashes and every cache behind it see)."""

import json
from pathlib import Path

import pytest

from bench.replay import ReplayItem, prompt_for_item, prompt_of
from bench.scenario import Scenario, Source, build_workload, load_jsonl, load_scenario
from bench.traces import TraceError
from gateway.service import prefix_hashes

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, rows: list[dict], name: str = "t.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_both_schemas_load(tmp_path):
    plain = write(tmp_path, [{"arrival_s": 1.5, "input_tokens": 10, "output_tokens": 5}], "plain.jsonl")
    assert [(r.arrival_s, r.input_tokens, r.output_tokens, r.hash_ids) for r in load_jsonl(plain)] == \
        [(1.5, 10, 5, ())]
    mooncake = write(tmp_path, [
        {"timestamp": 5000, "input_length": 1100, "output_length": 30, "hash_ids": [1, 2, 4]},
        {"timestamp": 2500, "input_length": 600, "output_length": 20, "hash_ids": [1, 2]},
    ], "mooncake.jsonl")
    rows = load_jsonl(mooncake)
    assert [r.arrival_s for r in rows] == [0.0, 2.5]            # ms to s, sorted, re-based to the first request
    assert [(r.input_tokens, r.output_tokens, r.hash_ids) for r in rows] == [(600, 20, (1, 2)), (1100, 30, (1, 2, 4))]


@pytest.mark.parametrize("row,problem", [
    ({"timestamp": 0, "input_length": 600, "output_length": 20, "hash_ids": [1], "arrival_s": 0}, "mixes"),
    ({"timestamp": 0, "input_length": 600, "output_length": 20}, "missing"),
    ({"arrival_s": 0, "input_tokens": 10}, "missing"),
    ({"timestamp": 0, "input_length": 600, "output_length": 20, "hash_ids": [1, "2"]}, "list of ints"),
    ({"timestamp": 0, "input_length": 600, "output_length": 20, "hash_ids": 3}, "list of ints"),
    ({"timestamp": 0, "input_length": 0, "output_length": 20, "hash_ids": []}, "positive"),
    ([1, 2, 3], "JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, row, problem):
    good = {"arrival_s": 0, "input_tokens": 10, "output_tokens": 5}
    path = write(tmp_path, [good, row], "bad.jsonl")
    with pytest.raises(TraceError, match=f"bad.jsonl:2: .*{problem}"):
        load_jsonl(path)


def test_hash_ids_reach_items_and_are_cut_with_the_prompt(tmp_path):
    path = write(tmp_path, [
        {"timestamp": 0, "input_length": 1100, "output_length": 30, "hash_ids": [7, 8, 9]},
        {"timestamp": 1000, "input_length": 3000, "output_length": 100, "hash_ids": [7, 8, 9, 10, 11, 12]},
    ])
    sc = Scenario(duration_s=10, sources=[Source(trace=str(path))])
    short, long = build_workload(sc, 32768)
    assert short.prefix_hashes == (7, 8, 9) and long.prefix_hashes == (7, 8, 9, 10, 11, 12)
    # a 2048 window keeps 2048 - 100 - 1 = 1947 prompt tokens: blocks 0..3 (the fourth partial)
    _, clipped = build_workload(sc, 2048)
    assert clipped.input_tokens == 1947 and clipped.prefix_hashes == (7, 8, 9, 10)
    # smaller blocks: the same prompt spans more of them
    small = Scenario(duration_s=10, sources=[Source(trace=str(path), block_tokens=256)])
    first, _ = build_workload(small, 2048)
    assert first.prefix_hashes == (7, 8, 9) and first.block_tokens == 256
    with pytest.raises(ValueError):
        Source(trace=str(path), block_tokens=0)


def test_equal_ids_give_equal_text():
    a = ReplayItem(0.0, 1100, 10, prefix_hashes=(1, 2, 3))
    b = ReplayItem(0.0, 1400, 10, prefix_hashes=(1, 2, 4))
    c = ReplayItem(0.0, 1100, 10, prefix_hashes=(5, 2, 3))
    pa, pb, pc = (prompt_for_item(i).split() for i in (a, b, c))
    assert pa[:1024] == pb[:1024] and pa[1024:] != pb[1024:1100]
    assert pa[:512] != pc[:512] and pa[512:1024] == pc[512:1024]
    assert prefix_hashes(" ".join(pa))[:4] == prefix_hashes(" ".join(pb))[:4]
    assert prefix_hashes(" ".join(pa))[0] != prefix_hashes(" ".join(pc))[0]


@pytest.mark.parametrize("n_in,hashes,block", [(1, (1,), 512), (700, (1, 2), 512), (1100, (1,), 512),
                                               (2000, (1, 2, 3, 4, 5, 6), 512), (300, (1, 2, 3), 128), (40, (), 512)])
def test_prompt_has_exactly_the_items_tokens(n_in, hashes, block):
    item = ReplayItem(0.0, n_in, 10, prefix_hashes=hashes, block_tokens=block)
    assert len(prompt_for_item(item).split()) == n_in


def test_tokens_past_the_blocks_are_unique_and_no_ids_is_plain():
    item = ReplayItem(0.0, 600, 10, prefix_hashes=(1,))
    one, two = prompt_for_item(item).split(), prompt_for_item(item).split()
    assert one[:512] == two[:512] and set(one[512:]).isdisjoint(two[512:])
    plain = [prompt_for_item(ReplayItem(0.0, 40, 10)).split() for _ in range(2)]
    assert len(plain[0]) == 40 and plain[0][0] != plain[1][0]      # no ids: not even the first block is shared
    assert len(" ".join(plain[0])) < len(prompt_of(40)) + 16        # about as long (the gateway counts characters)
    assert prompt_for_item(item, block_tokens=256).split()[256] != one[256]   # explicit size overrides the item's


def test_example_scenario_builds(monkeypatch):
    monkeypatch.chdir(ROOT)
    sc = load_scenario(Path("examples/prefix-scenario.yaml"))
    items = build_workload(sc, 4096)
    assert 30 <= len(items) <= 60 and items[0].arrival_s == 0.0 and items[-1].arrival_s < 25
    assert all(600 <= i.input_tokens <= 3000 and 20 <= i.output_tokens <= 300 for i in items)
    assert all(len(i.prefix_hashes) == -(-i.input_tokens // 512) for i in items)
    # later turns repeat earlier turns' blocks as their prefix
    firsts = {i.prefix_hashes[0] for i in items}
    assert len(firsts) < len(items)
    assert all(len(prompt_for_item(i).split()) == i.input_tokens for i in items)
