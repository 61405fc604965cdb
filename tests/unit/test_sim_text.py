"""The tokenizer (Qwen3's real BPE), chat template and reply text: consistent counts and deterministic output."""
import pytest

from cxygpt_sim import text


@pytest.mark.parametrize("sample", ["", "Hello, world!", "  two  spaces\n\nand lines", "Ünïcode 😀 ok",
                                    "x" * 1000, "<|im_start|>user\nhi<|im_end|>",
                                    "人工智能正在改变我们的生活方式。", "𠀀 rare 龘"])
def test_pieces_cover_the_text_exactly(sample):
    assert "".join(text.pieces(sample)) == sample
    assert text.count_tokens(sample) == len(text.pieces(sample)) == len(text.token_ids(sample))


def test_ids_are_qwens_own():
    # the ids Qwen2/Qwen3's tokenizer gives (its model card's example and the ChatML special tokens)
    assert text.token_ids("Hello world") == [9707, 1879]
    assert text.token_ids("<|im_start|>user\nhi<|im_end|>") == [151644, 872, 198, 6023, 151645]
    assert text.detokenize([9707, 1879]) == "Hello world"


@pytest.mark.parametrize("sample, chars_per_token", [
    ("The quick brown fox jumps over the lazy dog while the engine schedules every request in turn.", (4, 6)),
    ("大型语言模型是一种基于深度学习的人工智能系统，它通过在海量文本数据上进行训练，学会理解和生成自然语言。", (1.3, 2.2)),
    ("def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n", (2, 3.5)),
])
def test_counts_are_realistic_for_english_chinese_and_code(sample, chars_per_token):
    # Qwen's published ratios: ~4-5 characters a token in English, ~1.5 Chinese characters, code in between
    low, high = chars_per_token
    assert low <= len(sample) / text.count_tokens(sample) <= high


def test_a_character_over_several_byte_tokens_streams_whole_in_its_last_token():
    ids = text.token_ids("𠀀")
    assert len(ids) == 3 and text.token_pieces(ids) == ["", "", "𠀀"]


def test_chat_template_is_chatml_with_generation_prompt():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]}]
    rendered = text.render_chat(messages)
    assert rendered == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|media_pad|><|im_end|>\n"
                        "<|im_start|>assistant\n")
    assert not text.render_chat(messages, add_generation_prompt=False).endswith("assistant\n")
    assert text.last_user_text(messages) == "Hi<|media_pad|>"


@pytest.mark.parametrize("messages, loc", [([], "body.messages"), ("hi", "body.messages"),
                                           ([3], "body.messages.0"), ([{"content": "x"}], "body.messages.0.role"),
                                           ([{"role": "user", "content": 5}], "body.messages.0.content"),
                                           ([{"role": "user", "content": [{"type": "text"}]}],
                                            "body.messages.0.content.0.text")])
def test_bad_messages_name_the_field(messages, loc):
    with pytest.raises(text.ChatFormatError) as e:
        text.render_chat(messages)
    assert e.value.loc == loc


def test_replies_are_deterministic_readable_and_stop_naturally():
    writer = text.ReplyWriter()
    pieces, reason = writer.reply("What is a KV cache?", 1000)
    assert reason == "stop" and (pieces, reason) == writer.reply("What is a KV cache?", 1000)
    reply = "".join(pieces)
    assert reply[0].isupper() and reply.endswith(".")
    assert text.count_tokens(reply) == len(pieces)
    assert any(text.ReplyWriter(seed=seed).reply("What is a KV cache?", 1000)[0] != pieces for seed in range(1, 5))


def test_max_tokens_cuts_the_reply_with_length():
    pieces, reason = text.ReplyWriter().reply("anything", 3)
    assert (len(pieces), reason) == (3, "length")
    assert text.count_tokens("".join(pieces)) == 3


def test_ignore_eos_keeps_talking_until_max_tokens():
    for mode in ("corpus", "echo"):
        pieces, reason = text.ReplyWriter(mode).reply("say this back", 500, ignore_eos=True)
        assert (len(pieces), reason) == (500, "length")
        assert text.count_tokens("".join(pieces)) == 500


def test_echo_mode_repeats_the_prompt():
    pieces, reason = text.ReplyWriter("echo").reply("  please echo me  ", 100)
    assert ("".join(pieces), reason) == ("please echo me", "stop")
