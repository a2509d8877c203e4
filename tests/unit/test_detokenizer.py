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


def test_a_fast_tokenizers_library_decode_gives_transformers_text():
    """The detokenizer calls the tokenizers library directly for fast tokenizers without clean-up: the same
    text as transformers' decode, streamed token by token, on the embedded model's byte-level BPE."""
    import random

    import tokenizers
    from transformers import PreTrainedTokenizerFast

    from handlers.detokenizer import IncrementalDetokenizer, decoder_of

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "Ġ": 4, "c": 5, "Ġa": 6, "ab": 7}  # Ġ: a space, byte-level
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("a", "b"), ("Ġ", "a")]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    backend = tokenizer.backend_tokenizer  # transformers keeps its own copy
    assert decoder_of(tokenizer) == backend.decode
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(len(vocab)) for _ in range(rng.randrange(1, 12))]
        for skip in (True, False):
            assert backend.decode(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)
        stream = IncrementalDetokenizer(tokenizer, ids[:1])
        text = "".join(stream.add(token) for token in ids[1:])
        assert text == tokenizer.decode(ids, skip_special_tokens=True)[len(tokenizer.decode(ids[:1], skip_special_tokens=True)):]
    tokenizer.clean_up_tokenization_spaces = True  # transformers then edits the text: its own decode is kept
    assert decoder_of(tokenizer) == tokenizer.decode
