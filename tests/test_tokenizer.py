import pytest

from slm.tokenizer import EOT_ID, gpt2_tokenizer

STORY = (
    "Once upon a time, a little girl named Lily found a shiny 🐚 on the beach. "
    "She said, “Look, Mom!” Her mom smiled: «C'est très joli» — 可爱的贝壳 🐶🐱\n"
    "The end."
)


def test_known_gpt2_ids(tokenizer):
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.encode("Once upon a time") == [7454, 2402, 257, 640]
    assert tokenizer.encode(" the") == [262]
    assert tokenizer.eot_id == EOT_ID == 50256
    assert tokenizer.vocab_size == 50257


def test_round_trip_with_unicode_and_emoji(tokenizer):
    ids = tokenizer.encode(STORY)
    assert tokenizer.decode(ids) == STORY
    assert tokenizer.encode_batch([STORY, "Hello world"]) == [ids, [15496, 995]]


def test_end_of_text_is_special_in_prompts_but_not_in_data(tokenizer):
    assert tokenizer.encode("a<|endoftext|>b")[1] == EOT_ID
    assert EOT_ID not in tokenizer.encode_ordinary("a<|endoftext|>b")


def test_tokens_holding_part_of_a_character_display_as_bytes(tokenizer):
    ids = tokenizer.encode("🐶")
    assert len(ids) > 1, "the emoji should span several byte-level tokens"
    shown = tokenizer.token_strings(ids)
    assert len(shown) == len(ids)
    assert all("\\x" in piece for piece in shown[-1:]), shown
    assert tokenizer.token_strings(tokenizer.encode(" the cat")) == [" the", " cat"]


def test_stream_decoder_never_emits_broken_characters(tokenizer):
    ids = tokenizer.encode(STORY)
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == STORY
    assert all("\ufffd" not in p for p in pieces)


def test_out_of_range_ids_are_refused(tokenizer):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tokenizer.decode([50257])


def test_a_damaged_ranks_file_is_refused(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("SGVsbG8= 0\n")
    with pytest.raises(ValueError, match="sha256"):
        gpt2_tokenizer(str(bad))


def test_documents_encode_to_each_text_then_end_of_text_in_parallel(tokenizer):
    texts = [STORY, "", "  trailing space  ", "Hello world", "emoji 🐉 end\n"] * 7
    expected = [t for text in texts for t in [*tokenizer.encode_ordinary(text), tokenizer.eot_id]]
    for threads in (1, 3, 100):
        assert tokenizer.encode_documents(texts, num_threads=threads).tolist() == expected
    # a literal "<|endoftext|>" inside a text stays text
    literal = ["a <|endoftext|> b", "c"]
    assert tokenizer.encode_documents(literal).tolist() == [
        *tokenizer.encode_ordinary(literal[0]), tokenizer.eot_id, *tokenizer.encode_ordinary("c"), tokenizer.eot_id
    ]
    assert tokenizer.encode_documents([]).size == 0
