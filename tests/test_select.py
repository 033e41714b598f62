"""Layer selection (shortrt.select) and the LayerMap it returns."""
import math

import pytest

from shortrt.calibration import Scores
from shortrt.layermap import FORMAT, LayerEntry, LayerMap
from shortrt.selection import select

NAN = float("nan")


def make_scores(**override) -> Scores:
    """Six layers with hand-picked scores whose right answers are easy to see."""
    L = 6
    # span_angular[start][n-1] = distance between h_start and h_{start+n}; NaN past the end.
    span = [[(0.1 * (s + 1) + 0.05 * n if s + n <= L else NAN) for n in range(1, L + 1)] for s in range(L)]
    span[3][1] = 0.01   # layers 3,4 form the closest span of two
    span[1][2] = 0.02   # layers 1,2,3 the closest span of three
    fields = dict(
        model="tiny", num_layers=L,
        bi=[0.9, 0.2, 0.5, 0.1, 0.3, 0.8],
        angular=[0.4, 0.1, 0.2, 0.05, 0.15, 0.35],
        attn_bi=[0.5, 0.6, 0.05, 0.4, 0.02, 0.3],
        mlp_bi=[0.3, 0.2, 0.1, 0.2, 0.1, 0.4],
        max_span=L, span_cos=[[math.cos(math.pi * v) for v in row] for row in span], span_angular=span,
        data={"source": "test", "n_tokens": 100, "seq_len": 10, "n_sequences": 10},
    )
    fields.update(override)
    return Scores(**fields)


def test_shortgpt_removes_lowest_block_influence():
    lmap = select(make_scores(), remove=2, method="shortgpt")
    assert lmap.removed == [1, 3]
    assert lmap.retained == [0, 2, 4, 5]
    assert lmap.num_attention == 4 and lmap.method == "shortgpt"
    assert lmap.scores["metric"] == "bi" and lmap.scores["bi"][3] == pytest.approx(0.1)
    assert lmap.calibration["n_tokens"] == 100 and lmap.source == "tiny"


def test_shortgpt_ties_go_to_the_lower_index():
    lmap = select(make_scores(bi=[0.5, 0.2, 0.2, 0.2, 0.9, 0.9]), remove=2)
    assert lmap.removed == [1, 2]


def test_span_picks_the_closest_contiguous_span():
    assert select(make_scores(), remove=2, method="span").removed == [3, 4]
    lmap = select(make_scores(), remove=3, method="span")
    assert lmap.removed == [1, 2, 3]
    assert lmap.scores["span"] == {"start": 1, "length": 3, "angular": pytest.approx(0.02)}


def test_span_skips_missing_entries_and_respects_max_span():
    scores = make_scores(max_span=2)
    with pytest.raises(ValueError, match="at most 2 layers"):
        select(scores, remove=3, method="span")
    span = [list(row) for row in make_scores().span_angular]
    span[3][1] = None  # JSON null for a missing value
    assert select(make_scores(span_angular=span), remove=2, method="span").removed == [0, 1]


def test_attention_removes_attention_sublayers_and_keeps_mlps():
    lmap = select(make_scores(), remove=2, method="attention")
    assert lmap.removed == [] and len(lmap.layers) == 6
    assert lmap.removed_attention == [2, 4]
    assert [e.attention for e in lmap.layers] == [True, True, False, True, False, True]
    assert all(e.mlp for e in lmap.layers)
    assert lmap.num_attention == 4 and not lmap.transformers_compatible


def test_last_keeps_the_final_layer():
    assert select(make_scores(), remove=2, method="last").removed == [3, 4]
    assert select(make_scores(), remove=5, method="last").retained == [5]


def test_random_is_seeded():
    a = select(make_scores(), remove=3, method="random", seed=1)
    b = select(make_scores(), remove=3, method="random", seed=1)
    assert a.removed == b.removed and len(a.removed) == 3
    seeds = {tuple(select(make_scores(), remove=3, method="random", seed=s).removed) for s in range(8)}
    assert len(seeds) > 1


def test_ratio_rounds_to_a_count():
    assert len(select(make_scores(), ratio=0.34).removed) == 2   # 6 * 0.34 = 2.04
    assert len(select(make_scores(), ratio=0.25).removed) == 2   # 1.5 rounds to even
    assert select(make_scores(), remove=0).is_dense


@pytest.mark.parametrize("kwargs, message", [
    (dict(remove=2, ratio=0.5), "exactly one"),
    (dict(), "exactly one"),
    (dict(remove=6), "cannot remove 6 of 6"),
    (dict(remove=7, method="last"), "cannot remove 7 of 6"),
    (dict(remove=-1), "negative"),
    (dict(remove=2.5), "must be an integer"),
    (dict(remove=2.0), "must be an integer"),
    (dict(remove=True), "must be an integer"),
    (dict(ratio=1.0), r"\[0, 1\)"),
    (dict(ratio=-0.1), r"\[0, 1\)"),
    (dict(ratio="half"), "must be a number"),
    (dict(remove=2, method="streamline"), "unknown selection method 'streamline'"),
])
def test_bad_requests_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        select(make_scores(), **kwargs)


def test_missing_scores_for_the_method_are_named():
    scores = make_scores().to_json()
    del scores["attn_bi"]
    with pytest.raises(ValueError, match="'attn_bi'"):
        select(scores, remove=1, method="attention")
    scores = make_scores().to_json()
    del scores["span_angular"]
    with pytest.raises(ValueError, match="'span_angular'"):
        select(scores, remove=1, method="span")
    with pytest.raises(ValueError, match="not finite at layers \\[2\\]"):
        select(make_scores(bi=[0.1, 0.2, NAN, 0.3, 0.4, 0.5]), remove=1)
    # Methods that need no scores work without them.
    assert select({"num_layers": 6}, remove=2, method="last").removed == [3, 4]


def test_select_reads_a_saved_scores_file(tmp_path):
    path = tmp_path / "scores.json"
    make_scores().save(path)
    assert select(path, remove=2, method="span").removed == [3, 4]
    assert select(str(path), remove=2).removed == [1, 3]
    with pytest.raises(FileNotFoundError, match="scores file not found"):
        select(tmp_path / "missing.json", remove=1)


def test_from_removed_validates_indices():
    lmap = LayerMap.from_removed(5, [3, 1])
    assert lmap.removed == [1, 3] and lmap.retained == [0, 2, 4]
    with pytest.raises(ValueError, match="index 5 is out of range .* 5 layers"):
        LayerMap.from_removed(5, [5])
    with pytest.raises(ValueError, match="index -1 is out of range"):
        LayerMap.from_removed(5, [-1])
    with pytest.raises(ValueError, match="repeated: \\[2\\]"):
        LayerMap.from_removed(5, [2, 2])
    with pytest.raises(ValueError, match="cannot remove all 3 layers"):
        LayerMap.from_removed(3, [0, 1, 2])


def test_layer_map_json_round_trip_and_format():
    lmap = select(make_scores(), remove=2, method="attention")
    d = lmap.to_json()
    assert d["format"] == FORMAT and d["layers"][2] == {"source": 2, "kind": "layer", "attention": False,
                                                          "mlp": True}
    again = LayerMap.from_json(d)
    assert again == lmap
    with pytest.raises(ValueError, match='unsupported format "other/2"'):
        LayerMap.from_json({**d, "format": "other/2"})
    with pytest.raises(ValueError, match="missing 'layers'"):
        LayerMap.from_json({"format": FORMAT, "source_num_layers": 4})
    with pytest.raises(ValueError, match="appears in more than one entry"):
        LayerMap(4, [LayerEntry(0), LayerEntry(0)], "manual")
    with pytest.raises(ValueError, match="both kept and removed"):
        LayerMap(4, [LayerEntry(0), LayerEntry(1)], "manual", removed=[1])
    with pytest.raises(ValueError, match="neither attention nor MLP"):
        LayerMap(4, [LayerEntry(0, attention=False, mlp=False)], "manual")


def test_composing_maps_stays_relative_to_the_original():
    first = LayerMap.from_removed(8, [1, 5])                    # keeps 0 2 3 4 6 7
    second = LayerMap.from_removed_attention(6, [0])            # then: no attention in entry 0
    both = first.then(LayerMap.from_removed(6, [2, 4]))         # drops entries 2 and 4: layers 3 and 6
    assert both.retained == [0, 2, 4, 7] and both.removed == [1, 3, 5, 6]
    att = first.then(second)
    assert att.removed_attention == [0] and att.removed == [1, 5]
    with pytest.raises(ValueError, match="for 5 layers but the checkpoint has 6"):
        first.then(LayerMap.from_removed(5, [0]))
