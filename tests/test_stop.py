"""Stop strings: the streaming detokenizer that never lets a stop string (or its start) out.

Each case feeds real GPT-2 tokens one at a time and checks what a streaming client would see:
the pieces, the text in total, and which stop string ended it.
"""
from __future__ import annotations

import pytest

from nanopipe.tokenizer import StopStream, get_tokenizer


@pytest.fixture(scope="module")
def tok():
    return get_tokenizer()


def run(tok, ids, stops):
    """Feed ids until the stream stops; (pieces pushed, flush, stopped, tokens consumed)."""
    s = StopStream(tok, stops)
    pieces, used = [], 0
    for t in ids:
        pieces.append(s.push(t))
        used += 1
        if s.stopped is not None:
            break
    tail = s.flush()
    assert "".join(pieces) + tail == s.text, "text must be exactly what was let out"
    return pieces, tail, s.stopped, used


def test_worked_example_from_the_docstring(tok):
    ids = tok.encode(" Hi\nUser: more")
    assert [tok.decode([t]) for t in ids] == [" Hi", "\n", "User", ":", " more"]
    pieces, tail, stopped, used = run(tok, ids, ["\nUser:"])
    assert pieces == [" Hi", "", "", ""] and tail == ""
    assert stopped == "\nUser:" and used == 4, "generation must end at the token completing the stop string"


def test_held_text_comes_out_when_it_cannot_match(tok):
    ids = tok.encode(" Hi\nUser there")
    pieces, tail, stopped, _ = run(tok, ids, ["\nUser:"])
    assert stopped is None
    assert [tok.decode([t]) for t in ids] == [" Hi", "\n", "User", " there"]
    assert pieces == [" Hi", "", "", "\nUser there"] and tail == "", \
        "'\\n' and '\\nUser' could start the stop string: held back until ' there' rules it out"


def test_held_text_comes_out_at_the_end(tok):
    pieces, tail, stopped, _ = run(tok, tok.encode(" Hi\nUser"), ["\nUser:"])
    assert stopped is None and pieces == [" Hi", "", ""] and tail == "\nUser"


def test_stop_string_inside_one_token_cuts_the_token(tok):
    # " world" is one token; the stop "or" lies inside it: " w" comes out, the rest does not
    ids = tok.encode("Hello world again")
    pieces, tail, stopped, used = run(tok, ids, ["or"])
    assert stopped == "or" and used == 2 and "".join(pieces) + tail == "Hello w"


def test_stop_string_spanning_several_tokens(tok):
    text = "The end of the story. THE END and more"
    ids = tok.encode(text)
    pieces, tail, stopped, used = run(tok, ids, ["THE END"])
    assert stopped == "THE END"
    assert "".join(pieces) + tail == "The end of the story. "
    assert tok.decode(ids[:used]).endswith("THE END") and not tok.decode(ids[:used - 1]).endswith("THE END")


def test_earliest_of_several_stops_wins(tok):
    ids = tok.encode("a, b. c")
    _, _, stopped, _ = run(tok, ids, [".", ","])
    assert stopped == ","


def test_multibyte_characters_split_across_tokens(tok):
    # "你好" is four tokens, each holding part of a character; the stop is the second character
    ids = tok.encode("你好")
    assert len(ids) == 4 and tok.decode(ids[:1]) == "\ufffd", "the test needs a character split over tokens"
    pieces, tail, stopped, used = run(tok, ids, ["好"])
    assert pieces == ["", "你", "", ""] and stopped == "好" and used == 4
    assert "".join(pieces) + tail == "你"


def test_stop_string_made_of_half_characters_never_shows_a_replacement(tok):
    ids = tok.encode("ok 你好 ok")
    pieces, tail, stopped, _ = run(tok, ids, ["你好 x"])
    assert stopped is None
    assert "".join(pieces) + tail == "ok 你好 ok"
    assert not any("\ufffd" in p for p in pieces), pieces


def test_no_stops_is_a_plain_stream_decoder(tok):
    ids = tok.encode("Hello 👋🏽 world")
    pieces, tail, stopped, _ = run(tok, ids, [])
    assert stopped is None and "".join(pieces) + tail == "Hello 👋🏽 world"


def test_after_stop_nothing_more_comes_out(tok):
    s = StopStream(tok, ["!"])
    assert s.push(tok.encode("Hi!")[0]) == "Hi"
    assert s.push(tok.encode("!")[0]) == "" and s.stopped == "!"
    assert s.push(tok.encode(" more")[0]) == "" and s.flush() == "" and s.text == "Hi"
