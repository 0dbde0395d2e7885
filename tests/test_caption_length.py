"""captions.length: how many captions X2-VLM's 30-word / 40-token text side cuts, hand-counted."""

from capret_utils.captions import length


def test_truncation_report_hand_counted():
    caps = ["one two three", " ".join(["w"] * 35), " ".join(["x"] * 31), "", "..."]
    rep = length.truncation_report(caps, count_tokens=lambda t: 2 * len(t.split()), max_words=30, max_tokens=40)
    assert rep["captions"] == 4 and rep["empty_after_cleaning"] == 1  # "" is no caption; "..." cleans to nothing
    assert rep["cut_by_words"] == 2 and rep["words_dropped_mean"] == 3.0 and rep["words_dropped_max"] == 5
    # tokens are counted on the 30-word cleaned text: 2 x 3 = 6 and 2 x 30 = 60 > 38 for the two long ones
    assert rep["cut_by_tokens"] == 2 and rep["tokens_dropped_max"] == 60 - 38
    assert rep["words_p50_p95_max"][2] == 35


def test_default_counter_ignores_captions_that_clean_to_nothing():
    counter, name = length.default_counter(["...", "a red short sleeve top", ""])
    assert counter("a red top") >= 3 and name
