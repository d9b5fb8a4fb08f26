"""The published numbers (app/reporting/published.py), pinned row by row to the papers: the seed paper's Tables 1 and
2 (arXiv:2503.07943), CLMLF, MGNNS and MDSE on MVSA (MDSE's README table, github.com/royal-dargon/MDSE, lists all three
under W-F1), and the SemEval-2020 Task 8 task A winner. Each row says which F1 it reports and which split it used."""

import pytest

from fusion.app.reporting.published import (PUBLISHED, PUBLISHED_SPLITS, like_for_like, paper_row, run_split,
                                            split_lines, split_note)

# model: (MVSA-Single accuracy, F1, MVSA-Multi accuracy, F1), from the seed paper's Table 1, which does not say which
# F1 any of them is.
SEED_TABLE_1 = {
    "SentiBank": (.45, .43, .55, .51),
    "SentiStrength": (.49, .48, .50, .55),
    "SentiBank+SentiStrength": (.52, .50, .65, .55),
    "HSAN": (None, .66, None, .67),
    "DNN-LR": (.61, .61, .67, .66),
    "CNN-Multi": (.61, .58, .66, .64),
    "MultiSentiNet-Avg": (.66, .66, .67, .66),
    "MultiSentiNet-Att": (.69, .69, .68, .68),
    "Dual-Pipeline": (.57, .56, .73, .69),
    "Basic": (.73, .71, .68, .67),
    "Self-Attention": (.72, .70, .68, .67),
    "Dual-Attention": (.72, .71, .67, .66),
}
# model: (MVSA-Single accuracy, weighted F1, MVSA-Multi accuracy, weighted F1, venue and year in the source, the
# published split it used or None).
LATER = {"CLMLF": (.7533, .7346, .7200, .6983, "Findings of NAACL 2022", "clmlf"),
         "MGNNS": (.7377, .7270, .7249, .6934, "ACL-IJCNLP 2021", None),
         "MDSE": (.7622, .7571, .7231, .7012, "ICASSP 2024", "clmlf")}


@pytest.mark.parametrize("dataset, offset", [("mvsa-single", 0), ("mvsa-multi", 2)])
def test_mvsa_rows_are_exactly_the_published_ones(dataset, offset):
    rows = PUBLISHED[dataset]
    seed = {row.model: (row.accuracy, row.f1) for row in rows if row.source.endswith("Table 1")}
    assert seed == {model: values[offset:offset + 2] for model, values in SEED_TABLE_1.items()}
    assert {row.f1_kind for row in rows if row.model in SEED_TABLE_1} == {"kind not stated"}
    later = {row.model: row for row in rows if row.model in LATER}
    assert {model: (row.accuracy, row.f1) for model, row in later.items()} == {
        model: values[offset:offset + 2] for model, values in LATER.items()}
    for model, row in later.items():
        venue, split = LATER[model][4:]
        assert row.source.startswith(f"{model}: ") and venue in row.source and row.f1_kind == "weighted"
        assert row.split == (f"{split}-{dataset}" if split else None)
        assert row.f1_label == "F1 (weighted)"
    assert len(rows) == len(SEED_TABLE_1) + len(LATER)
    assert all(row.macro_f1 is None for row in rows)


def test_memotion_rows_and_our_heads():
    rows = {(row.model, row.source): row.macro_f1 for row in PUBLISHED["memotion"]}
    assert rows == {("Dual-Attention", "Seed paper (Zhao et al., arXiv:2503.07943, 2025), Table 2 (§4.1.2)"): 0.3552,
                    ("SemEval-2020 Task 8 winner", "IITK (Keswani et al.), SemEval-2020 Task 8 task A winner, "
                     "SemEval 2020 pp. 1135-1140 (doi:10.18653/v1/2020.semeval-1.150)"): 0.3547}
    assert paper_row("memotion", "dual_attn").macro_f1 == 0.3552
    assert paper_row("mvsa-single", "self_attn").model == "Self-Attention"
    assert paper_row("mvsa-multi", "basic").value("weighted_f1") == 0.67
    assert paper_row("mvsa-multi", "text_only") is None and paper_row("csv", "basic") is None


def test_no_source_is_an_internal_file_and_every_later_source_has_venue_and_year():
    sources = {row.source for rows in PUBLISHED.values() for row in rows}
    assert not any(".md" in source or "shared/" in source or "Tables 1-2" in source for source in sources)
    assert not any("Memotion figure" in source for source in sources)
    assert all(any(year in source for year in ("2020", "2021", "2022", "2024", "2025")) for source in sources)


@pytest.mark.parametrize("cache, split", [
    ({"split_kind": "stratified", "split_source": "seeded stratified"}, None),
    ({"split_kind": "file", "split_file": "clmlf-mvsa-single.tsv", "split_file_sha256": "ab" * 32},
     "clmlf-mvsa-single"),
    ({"split_kind": "file", "split_file": "CLMLF_MVSA_Multi.csv", "split_file_sha256": "ab" * 32},
     "clmlf-mvsa-multi"),
    ({"split_kind": "file", "split_file": "mine.tsv", "split_file_sha256": "ab" * 32}, None),
    ({"split_kind": "memotion-official-test"}, "memotion-official-test"),
    ({"split_kind": "memotion-holdout"}, None),
])
def test_the_split_a_cache_was_made_with_decides_what_is_like_for_like(cache, split):
    assert run_split(cache) == split
    same = {row.model for rows in PUBLISHED.values() for row in rows if like_for_like(row, cache)}
    expected = {"clmlf-mvsa-single": {"CLMLF", "MDSE"}, "clmlf-mvsa-multi": {"CLMLF", "MDSE"},
                "memotion-official-test": {"SemEval-2020 Task 8 winner"}}.get(split, set())
    assert same == expected
    note = split_note(cache)
    if split:
        assert PUBLISHED_SPLITS[split].description in note and "like for like" in note
    else:
        assert "no published number" in note or "Not like for like" in note
    if cache.get("split_file") == "mine.tsv":
        assert "mine.tsv" in note and "abababababababab" in note


def test_split_lines_name_the_file_its_hash_and_the_ids_not_found():
    cache = {"split_kind": "file", "split_file": "clmlf-mvsa-single.tsv", "split_file_sha256": "cd" * 32,
             "split_source": "file clmlf-mvsa-single.tsv (sha256 cdcdcdcdcdcdcdcd)"}
    lines = split_lines(cache, {"ids_in_file_not_in_data": 3, "rows_in_data_not_in_file": 2})
    assert lines == ["- Splits: file clmlf-mvsa-single.tsv (sha256 cdcdcdcdcdcdcdcd).",
                     "- Split file `clmlf-mvsa-single.tsv`: 3 ids of the file not found in the data, 2 rows of the "
                     "data not in the file (left out)."]
