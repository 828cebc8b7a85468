"""The logits processors and stop-string rules in ``effdl.flover.sampling``, against naive loop references."""

import math
import random

import pytest
import torch

from effdl.core.tokenizer import ByteTokenizer
from effdl.errors import EffdlError
from effdl.flover.request import Decoded, SamplingParams
from effdl.flover.sampling import (
    apply_logit_bias,
    apply_penalties,
    decode_incrementally,
    find_stop,
    held_back,
    mask_tokens,
    process_logits,
)

V = 12


def naive_process(logits: list[float], prompt: list[int], output: list[int], presence: float = 0.0,
                  frequency: float = 0.0, repetition: float = 1.0, bias: dict[int, float] | None = None,
                  min_tokens: int = 0, stop_ids: tuple[int, ...] = ()) -> list[float]:
    """The documented rules one token at a time: bias, min_tokens mask, repetition, then frequency and presence."""
    out = list(logits)
    for token, value in (bias or {}).items():
        out[token] += value
    if len(output) < min_tokens:
        for token in stop_ids:
            out[token] = -math.inf
    for token in range(len(out)):
        if repetition != 1.0 and (token in prompt or token in output):
            out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
        count = sum(1 for t in output if t == token)
        out[token] -= frequency * count + presence * (1 if count else 0)
    return out


def _case(seed: int) -> tuple[list[float], list[int], list[int]]:
    rng = random.Random(seed)
    logits = [rng.uniform(-3, 3) for _ in range(V)]
    logits[rng.randrange(V)] = 0.0  # a zero logit: multiplied, so unchanged
    return logits, [rng.randrange(V) for _ in range(rng.randint(0, 6))], [rng.randrange(V) for _ in range(8)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("presence", "frequency", "repetition"), [
    (0.5, 0.0, 1.0), (0.0, 0.7, 1.0), (0.0, 0.0, 1.3), (0.0, 0.0, 0.6), (-1.5, 2.0, 1.8), (2.0, -2.0, 0.9)])
def test_penalties_match_a_naive_loop(seed, presence, frequency, repetition):
    logits, prompt, output = _case(seed)
    got = apply_penalties(torch.tensor(logits), prompt, output, presence, frequency, repetition)
    assert got.tolist() == pytest.approx(naive_process(logits, prompt, output, presence, frequency, repetition),
                                         abs=1e-5)


def test_repetition_penalty_covers_the_prompt_and_the_output_but_frequency_only_the_output():
    logits = [2.0, -2.0, 2.0, 2.0]
    got = apply_penalties(torch.tensor(logits), prompt=[0, 1], output=[2], repetition=2.0).tolist()
    assert got == [1.0, -4.0, 1.0, 2.0]  # positive halved, negative doubled, unseen token 3 untouched
    got = apply_penalties(torch.tensor(logits), prompt=[0, 1], output=[2, 2], frequency=0.5, presence=0.25).tolist()
    assert got == [2.0, -2.0, 2.0 - 1.0 - 0.25, 2.0]


def test_logit_bias_and_mask_match_a_naive_loop():
    logits, _, _ = _case(7)
    bias = {3: -100.0, 5: 4.5, 0: 0.25}
    got = apply_logit_bias(torch.tensor(logits), sorted(bias.items())).tolist()
    assert got == pytest.approx(naive_process(logits, [], [], bias=bias), abs=1e-5)
    masked = mask_tokens(torch.tensor(logits), {1, 4}).tolist()
    assert masked[1] == masked[4] == -math.inf
    assert [x for i, x in enumerate(masked) if i not in (1, 4)] == pytest.approx(
        [x for i, x in enumerate(logits) if i not in (1, 4)])


@pytest.mark.parametrize("num_output", [0, 2, 3, 5])
def test_process_logits_applies_everything_in_vllm_order(num_output):
    logits, prompt, output = _case(11)
    output = output[:num_output]
    params = SamplingParams(max_tokens=8, presence_penalty=0.3, frequency_penalty=0.4, repetition_penalty=1.5,
                            min_tokens=3, logit_bias={2: 1.5, 9: -3.0}, stop_token_ids=(6,))
    got = process_logits(torch.tensor(logits), params, prompt, output, eos_id=V - 1).tolist()
    want = naive_process(logits, prompt, output, 0.3, 0.4, 1.5, {2: 1.5, 9: -3.0}, 3, (6, V - 1))
    assert got == pytest.approx(want, abs=1e-5)
    assert (got[V - 1] == -math.inf) == (num_output < 3)


def test_process_logits_is_the_identity_by_default_and_ignore_eos_unmasks_eos():
    logits = torch.randn(V)
    assert process_logits(logits, SamplingParams(), [1, 2], [3], eos_id=0) is logits
    params = SamplingParams(min_tokens=2, ignore_eos=True, stop_token_ids=(4,))
    got = process_logits(logits, params, [], [], eos_id=0)
    assert got[0] == logits[0] and got[4] == -math.inf


@pytest.mark.parametrize(("params", "message"), [
    (dict(presence_penalty=2.5), "presence_penalty must be in [-2, 2]"),
    (dict(frequency_penalty=-2.1), "frequency_penalty must be in [-2, 2]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(min_tokens=17), "min_tokens must be in [0, max_tokens=16]"),
    (dict(min_tokens=-1), "min_tokens must be in"),
    (dict(logit_bias={3: 101.0}), "logit_bias values must be in [-100, 100]"),
    (dict(logit_bias={-1: 1.0}), "logit_bias keys must be token ids"),
])
def test_sampling_params_reject_out_of_range_values(params, message):
    with pytest.raises(EffdlError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**params)


def test_logit_bias_is_stored_as_sorted_pairs():
    assert SamplingParams(logit_bias={5: 1.0, 2: -1.0}).logit_bias == ((2, -1.0), (5, 1.0))


def _stream_with_stops(pieces: list[str], stop: list[str]) -> tuple[str, list[str]]:
    """What the engine's detokenise step shows, one token's text at a time: (final text, emitted deltas)."""
    text, shown, deltas = "", "", []
    for piece in pieces:
        text += piece
        if (hit := find_stop(text, stop)) >= 0:
            deltas.append(text[:hit][len(shown):])
            return text[:hit], deltas
        visible = text[:len(text) - held_back(text, stop)]
        deltas.append(visible[len(shown):])
        shown = visible
    return text, deltas


def test_a_stop_string_across_token_boundaries_is_never_partly_shown():
    pieces = list("BeBeB\x1bB")  # one character per token, as the byte tokenizer decodes
    final, deltas = _stream_with_stops(pieces, ["eB\x1b"])
    assert final == "BeB" and "".join(deltas) == "BeB"
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert "BeB".startswith(emitted)  # nothing shown is later taken back
    # A false start is released once it cannot become the stop any more.
    assert _stream_with_stops(list("xaby"), ["abc"]) == ("xaby", ["x", "", "", "aby"])


def test_held_back_holds_a_partial_character_and_a_stop_prefix_before_it():
    assert held_back("abc", ["cde"]) == 1
    assert held_back("abcd", ["cde"]) == 2
    assert held_back("ab\ufffd", []) == 1
    assert held_back("xab\ufffd", ["ab\u00e9"]) == 3  # "ab" + a split character may still become "abé"
    assert find_stop("one two three", ["three", "two"]) == 4 and find_stop("abc", ["d"]) == -1


def _trained_bpe(tmp_path, kind: str):
    """A small BPE tokenizer trained here: byte-level (GPT-2 style) or Metaspace (SentencePiece style, whose
    decoder drops the leading space of a window: the case that needs the context tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from effdl.core.tokenizer import load_tokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>" if kind == "metaspace" else None))
    if kind == "bytelevel":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    corpus = ["def parse(text):\n    return text.split()", "héllo wörld — 日本語 🙂 naïve café",
              "the cat sat on the mat"]
    tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet,
                                                             special_tokens=["<unk>"], show_progress=False))
    tok.save(str(tmp_path / "tokenizer.json"))
    return load_tokenizer(tmp_path, vocab_size=tok.get_vocab_size())


@pytest.mark.parametrize("kind", ["byte", "bytelevel", "metaspace"])
def test_incremental_decoding_equals_decoding_the_whole(tmp_path, kind):
    """Token by token, with a partial character pending at times, the text equals one decode of everything."""
    tokenizer = ByteTokenizer() if kind == "byte" else _trained_bpe(tmp_path, kind)
    rng = random.Random(0)
    texts = ["def parse(text):\n    return text.split()  # café", "héllo wörld — 日本語 🙂", "the  cat\tsat on the mat"]
    for text in texts:
        tokens = tokenizer.encode(text)
        state, pieces = Decoded(), []
        for n in range(1, len(tokens) + 1):
            before = state.text
            state = decode_incrementally(tokenizer, tokens[:n], state, final=n == len(tokens))
            assert state.text.startswith(before) and "\ufffd" not in state.text  # it only ever appends whole text
            pieces.append(state.text[len(before):])
        assert state.text == tokenizer.decode(tokens) == "".join(pieces)
        # Several tokens at once (an engine step after a slow one) decode the same.
        cuts = [*sorted(rng.sample(range(1, len(tokens)), 3)), len(tokens)]
        state = Decoded()
        for n in cuts:
            state = decode_incrementally(tokenizer, tokens[:n], state, final=n == len(tokens))
        assert state.text == tokenizer.decode(tokens)


def test_incremental_decoding_decodes_only_a_window():
    """The cost per step is the window's, not the output's: each call decodes at most the unread tokens plus the
    previous window's (measured by counting the tokens handed to the tokenizer)."""
    handed = []

    class Counting(ByteTokenizer):
        def decode(self, ids):
            handed.append(len(ids))
            return super().decode(ids)

    tokens = list(b"a long output, one token at a time. " * 30)
    state = Decoded()
    for n in range(1, len(tokens) + 1):
        state = decode_incrementally(Counting(), tokens[:n], state)
    assert state.text == bytes(tokens).decode()
    assert max(handed) <= 2  # ASCII: one new token and one of context, never the whole output
