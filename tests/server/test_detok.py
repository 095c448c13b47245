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
    d = Detokenizer(tok, ["END"])
    streamed = ""
    for i in tok("xx EN yy E", add_special_tokens=False)["input_ids"]:
        streamed += d.push(i)[0]
        assert "END" not in streamed
    assert not streamed.endswith("E")                          # could still become END
    assert streamed + d.flush() == "xx EN yy E"
