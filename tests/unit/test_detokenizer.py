from handlers.detokenizer import StopSequenceMatcher


def feed(matcher, pieces):
    return [matcher.add(piece) for piece in pieces]


def test_without_stop_sequences_everything_is_visible_at_once():
    matcher = StopSequenceMatcher([])
    assert feed(matcher, ["Hel", "lo", " world"]) == ["Hel", "lo", " world"]


def test_stop_sequence_spanning_pieces_is_cut_and_never_shown():
    matcher = StopSequenceMatcher(["END"])
    visible = feed(matcher, ["abc E", "N", "D tail"])
    assert "".join(visible) == "abc "
    assert matcher.stopped and matcher.text == "abc "


def test_a_false_start_is_released_when_it_stops_matching():
    matcher = StopSequenceMatcher(["END"])
    assert matcher.add("xE") == "x"  # "E" might start END: held back
    assert matcher.add("N") == ""
    assert matcher.add("x") == "ENx"
    assert not matcher.stopped


def test_earliest_of_several_stop_sequences_wins():
    matcher = StopSequenceMatcher(["world", "lo w"])
    assert "".join(feed(matcher, ["hel", "lo world"])) == "hel"


def test_flush_releases_held_back_text_at_the_end():
    matcher = StopSequenceMatcher(["###"])
    assert matcher.add("done#") == "done"
    assert matcher.flush() == "#"
