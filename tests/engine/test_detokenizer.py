"""IncrementalDetokenizer on a real tokenizer, no model: tests.helpers.make_tokenizer trains a
tiny byte-level BPE, so multi-byte characters split across tokens ("日本語" -> " 日本\\xe8",
"\\xaa\\x9e"). The joined deltas must equal tokenizer.decode of all ids, never show a U+FFFD for
a split character, and stop strings cut the text where they start, whichever tokens they span.
Stop strings are the output processor's StopRules over the detokenizer, driven here the way
OutputProcessor._emit drives them (`Emitter`)."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from adapterserve.server.engine.detokenizer import IncrementalDetokenizer
from adapterserve.server.engine.output import StopRules
from adapterserve.server.engine.sampling import SamplingParams
from adapterserve.server.model.tokenizer import Tokenizer
from tests.helpers import CORPUS, make_tokenizer

HELLO = "Hello, world."
HELLO_PIECES = ["H", "e", "ll", "o", ",", " ", "w", "o", "r", "l", "d", "."]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    path: Path = tmp_path_factory.mktemp("bpe")
    make_tokenizer(path)  # tokenizer.json + tokenizer_config.json is all Tokenizer reads
    return Tokenizer(path)


def ids_of(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


class Emitter:
    """One sequence's text as OutputProcessor hands it out: after each token, StopRules decide
    whether a stop string (or nothing) ends it; `add` returns that token's text (the cut text
    when it stops), `flush` the rest at the end. No EOS, no length limit."""

    def __init__(self, tok: Tokenizer, params: SamplingParams) -> None:
        self.params = params
        self.rules = StopRules(frozenset(), max_model_len=10**9)
        self.detok = IncrementalDetokenizer(tok, self.rules.holdback(params))
        self.output_ids: list[int] = []
        self.stopped = False

    @property
    def ids(self) -> list[int]:
        return self.detok.ids

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.output_ids.append(token)
        self.detok.add(token)
        seq = SimpleNamespace(
            params=self.params, output_ids=self.output_ids, num_tokens=len(self.output_ids)
        )
        stop = self.rules.after_token(seq, token, self.detok)
        if stop is None:
            return self.detok.take()
        self.stopped = True
        return self.detok.flush() if stop.text_end is None else self.detok.cut(stop.text_end)

    def flush(self) -> str:
        return "" if self.stopped else self.detok.flush()


def emitter(tok: Tokenizer, check_from: int = 0, **params) -> Emitter:
    """Stop strings are looked for from token `check_from` (0-based) on: min_tokens."""
    return Emitter(tok, SamplingParams(max_tokens=10**6, min_tokens=check_from + 1, **params))


def deltas(tok: Tokenizer, ids: list[int], check_from: int = 0, **params) -> tuple[list[str], str]:
    """(what each add returned, what flush returned)."""
    detok = emitter(tok, check_from, **params)
    out = [detok.add(t) for t in ids]
    return out, detok.flush()


def hello(tok: Tokenizer) -> list[int]:
    ids = ids_of(tok, HELLO)
    assert [tok.decode([i]) for i in ids] == HELLO_PIECES  # what the tests below rely on
    return ids


# ---- text ------------------------------------------------------------------------------------
def test_split_characters_are_emitted_once_complete(tok: Tokenizer):
    ids = ids_of(tok, "Café 日本語 🙂")
    pieces = [tok.decode([i]) for i in ids]
    assert sum("\ufffd" in p for p in pieces) >= 3  # the premise: characters split over tokens
    out, tail = deltas(tok, ids)
    assert out == ["Ca", "fé", "", " 日本語", "", "", " 🙂"] and tail == ""


@pytest.mark.parametrize("line", sorted(set(CORPUS)) + ["naïve 🙂🙂 日本語語 café", "🙂"])
def test_joined_deltas_equal_decode_of_all_ids(tok: Tokenizer, line: str):
    ids = ids_of(tok, line)
    out, tail = deltas(tok, ids)
    assert "".join(out) + tail == tok.decode(ids) == line
    assert not any("\ufffd" in piece for piece in out)


def test_random_ids_join_to_decode_of_all_ids(tok: Tokenizer):
    """Any id sequence, invalid UTF-8 included: the deltas add up to decode(all ids)."""
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 25))]
        out, tail = deltas(tok, ids)
        assert "".join(out) + tail == tok.decode(ids), ids


def test_flush_hands_out_an_unfinished_character(tok: Tokenizer):
    ids = ids_of(tok, "a 🙂")[:-1]  # the emoji's last byte never comes
    out, tail = deltas(tok, ids)
    assert "".join(out) == "a" and tail == tok.decode(ids)[1:] and tail.endswith("\ufffd")


def test_special_tokens_add_no_text(tok: Tokenizer):
    eos = next(iter(tok.eos_token_ids))
    ids = ids_of(tok, "Hel") + [eos] + ids_of(tok, "lo")
    out, tail = deltas(tok, ids)
    assert "".join(out) + tail == "Hello" and out[len(ids_of(tok, "Hel"))] == ""


# ---- stop strings ------------------------------------------------------------------------------
def test_stop_string_across_tokens_cuts_before_it(tok: Tokenizer):
    """The stop "lo, w" spans 'll' (its 'l'), 'o', ',', ' ', 'w'; 4 characters are held back meanwhile."""
    detok = emitter(tok, stop=("lo, w",))
    out = [detok.add(t) for t in hello(tok)[:7]]
    assert out == ["", "", "", "H", "e", "l", ""] and detok.stopped
    assert detok.flush() == "" and detok.flush() == ""


def test_include_stop_str_in_output_keeps_the_stop(tok: Tokenizer):
    out, tail = deltas(tok, hello(tok)[:7], stop=("lo, w",), include_stop_str_in_output=True)
    assert "".join(out[:-1]) == "Hel" and out[-1] == "lo, w" and tail == ""


def test_text_after_the_stop_is_dropped_and_later_tokens_ignored(tok: Tokenizer):
    """The stop is found in the middle of a token's text ('ll' ends in 'l' + 'o'); what the
    token adds after it is dropped, and tokens added after the stop change nothing."""
    detok = emitter(tok, stop=("lo",), include_stop_str_in_output=True)
    ids = hello(tok)
    out = [detok.add(t) for t in ids]
    assert detok.stopped and detok.ids == ids[:4]
    assert "".join(out) + detok.flush() == "Hello"


def test_earliest_stop_wins(tok: Tokenizer):
    out, tail = deltas(tok, hello(tok), stop=("world", "o, w"))
    assert "".join(out) + tail == "Hell"
    out, tail = deltas(tok, hello(tok), stop=("d.", "wor"))
    assert "".join(out) + tail == "Hello, "


def test_stop_at_the_start_emits_nothing(tok: Tokenizer):
    out, tail = deltas(tok, hello(tok), stop=("He",))
    assert out[:2] == ["", ""] and "".join(out) + tail == ""


def test_stop_string_with_a_split_character(tok: Tokenizer):
    ids = ids_of(tok, "Café 日本語 🙂")
    out, tail = deltas(tok, ids, stop=("本語",))
    assert "".join(out) + tail == "Café 日"
    out, tail = deltas(tok, ids, stop=("🙂",), include_stop_str_in_output=True)
    assert "".join(out) + tail == "Café 日本語 🙂"


def test_possible_stop_prefix_is_held_then_released(tok: Tokenizer):
    """The text "o, " may become the stop "o, x": held; once 'w' rules that out, its 'o' is
    released; at the end everything is."""
    detok = emitter(tok, stop=("o, x",))
    ids = hello(tok)
    out = [detok.add(t) for t in ids[:6]]  # "Hello, "
    assert "".join(out) == "Hell"
    out.append(detok.add(ids[6]))  # "Hello, w"
    assert "".join(out).startswith("Hello")
    out += [detok.add(t) for t in ids[7:]]
    assert not detok.stopped and "".join(out) + detok.flush() == HELLO


def test_stops_are_not_checked_below_min_tokens(tok: Tokenizer):
    """min_tokens: a stop string in the first tokens' text does not stop; once checking starts,
    a later one does."""
    out, tail = deltas(tok, hello(tok), check_from=3, stop=("He",))
    assert "".join(out) + tail == HELLO  # "He" came while not checked, and was emitted
    out, tail = deltas(tok, hello(tok), check_from=3, stop=("wor",))
    assert "".join(out) + tail == "Hello, "


@pytest.mark.parametrize(
    ("stops", "allowed"),
    [(("ll",), (HELLO, "He")), (("He", "wor"), ("Hello, ",))],
    ids=["stop-in-held-back-tail", "stop-already-emitted"],
)
def test_stop_in_unchecked_text_never_cuts_into_emitted_text(tok: Tokenizer, stops, allowed):
    """Either the unchecked stop is ignored (as vLLM does: only checked tokens' text can stop)
    or the text is cut before it, but never after part of it went out."""
    out, tail = deltas(tok, hello(tok), check_from=3, stop=stops)  # "Hell" unchecked
    assert "".join(out) + tail in allowed


def visible_texts(tok: Tokenizer, ids: list[int]) -> list[str]:
    """After each token, the text of the longest prefix of ids that ends on a whole character."""
    texts, last = [], ""
    for k in range(1, len(ids) + 1):
        full = tok.decode(ids[:k])
        last = last if full.endswith("\ufffd") else full
        texts.append(last)
    return texts


def expected_stop(tok: Tokenizer, ids, stops, include) -> tuple[str, int | None]:
    """The reference: at the first token whose whole-character text holds a stop string, cut at
    the earliest one (after it with include_stop_str_in_output). (text, stopping token)."""
    for k, text in enumerate(visible_texts(tok, ids), 1):
        hits = [(text.find(s), s) for s in stops if s in text]
        if hits:
            index, stop = min(hits)
            return text[: index + len(stop)] if include else text[:index], k
    return tok.decode(ids), None


def test_random_texts_and_stops_match_the_reference(tok: Tokenizer):
    text = " ".join(sorted(set(CORPUS)))
    rng = random.Random(7)
    stopped = 0
    for _ in range(400):
        start = rng.randrange(len(text))
        piece = text[start : start + rng.randint(1, 60)]
        stops = tuple(
            piece[(i := rng.randrange(len(piece))) : i + rng.randint(1, 6)]
            if rng.random() < 0.7
            else rng.choice(["zz", "日本", "🙂", "o", ", 2", "\n"])
            for _ in range(rng.randint(1, 3))
        )
        include = rng.random() < 0.5
        ids = ids_of(tok, piece)
        detok = emitter(tok, stop=stops, include_stop_str_in_output=include)
        out, at = [], None
        for k, token in enumerate(ids, 1):
            out.append(detok.add(token))
            if detok.stopped:
                at = k
                break
        case = (piece, stops, include)
        assert not any("\ufffd" in delta for delta in out), case
        assert ("".join(out) + detok.flush(), at) == expected_stop(tok, ids, stops, include), case
        stopped += at is not None
    assert stopped > 200  # most cases do stop
