"""The published numbers (app/reporting/published.py), pinned row by row to the values issue 13 lists from the
papers."""

import pytest

from fusion.app.reporting.published import PUBLISHED, paper_row, split_note

# model: (MVSA-Single accuracy, F1, MVSA-Multi accuracy, F1), from the seed paper's Table 1.
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
LATER = {"CLMLF (NAACL Findings 2022)": (.7533, .7346, .7200, .6983), "MGNNS (ACL 2021)": (.7377, .7270, .7249, .6934)}


@pytest.mark.parametrize("dataset, offset", [("mvsa-single", 0), ("mvsa-multi", 2)])
def test_mvsa_rows_are_exactly_the_published_ones(dataset, offset):
    rows = PUBLISHED[dataset]
    seed = {row.model: (row.accuracy, row.weighted_f1) for row in rows if row.source == "Seed paper, Table 1"}
    assert seed == {model: values[offset:offset + 2] for model, values in SEED_TABLE_1.items()}
    later = {row.source: (row.accuracy, row.weighted_f1) for row in rows if row.source in LATER}
    assert later == {source: values[offset:offset + 2] for source, values in LATER.items()}
    assert len(rows) == len(SEED_TABLE_1) + len(LATER)
    assert all(row.macro_f1 is None for row in rows)


def test_memotion_rows_and_our_heads():
    rows = {(row.model, row.source): row.macro_f1 for row in PUBLISHED["memotion"]}
    assert rows == {("Dual-Attention", "Seed paper, Memotion figure"): 0.3552,
                    ("SemEval-2020 Task 8 winner", "SemEval-2020 Task 8, task A winner"): 0.3547}
    assert paper_row("memotion", "dual_attn").macro_f1 == 0.3552
    assert paper_row("mvsa-single", "self_attn").model == "Self-Attention"
    assert paper_row("mvsa-multi", "basic").weighted_f1 == 0.67
    assert paper_row("mvsa-multi", "text_only") is None and paper_row("csv", "basic") is None


def test_no_source_is_an_internal_file_and_the_split_note_says_when_numbers_compare():
    sources = {row.source for rows in PUBLISHED.values() for row in rows}
    assert not any(".md" in source or "shared/" in source or "Tables 1-2" in source for source in sources)
    assert "not like for like" in split_note({"split_kind": "stratified", "split_source": "seeded stratified"})
    note = split_note({"split_kind": "file", "split_file": "clmlf.tsv", "split_file_sha256": "ab" * 32})
    assert "clmlf.tsv" in note and "same split file" in note
