"""Incremental detokenisation: stop strings across token boundaries, held-back tails, UTF-8."""

from transformers import AutoTokenizer

from server.engines.detok import Detokenizer


def run(tok, text, stop=()):
    d = Detokenizer(tok, stop)
    out, stopped = "", False
    for i in tok(text, add_special_tokens=False)["input_ids"]:
        piece, stopped = d.push(i)
        out += piece
        if stopped:
            break
    return out + d.flush(), stopped


def test_round_trip_without_stop(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Hello wörld 🚀, the quick brown fox."
    assert run(tok, text) == (text, False)


def test_stop_string_cuts_the_answer_even_across_tokens(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert run(tok, "one two three four", ["three"]) == ("one two ", True)
    assert run(tok, "one two three four", ["zzz", "o th"]) == ("one tw", True)
    assert run(tok, "abc", ["abcd"]) == ("abc", False)       # a held-back prefix is released at the end


def test_held_back_text_is_never_streamed_before_it_is_final(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # 1. the stop string is in the answer: nothing of it (or after it) is ever streamed
    d = Detokenizer(tok, ["END"])
    streamed, stopped = "", False
    for i in tok("xx EN yy END zz", add_special_tokens=False)["input_ids"]:
        piece, stopped = d.push(i)
        streamed += piece
        assert "END" not in streamed and "EN" not in streamed[6:] and "zz" not in streamed, streamed
        if stopped:
            break
    assert stopped and streamed + d.flush() == "xx EN yy "
    # 2. a tail that could still become the stop string is held back until the answer ends
    d = Detokenizer(tok, ["END"])
    streamed = "".join(d.push(i)[0] for i in tok("xx EN yy E", add_special_tokens=False)["input_ids"])
    assert not streamed.endswith("E")
    assert streamed + d.flush() == "xx EN yy E"
