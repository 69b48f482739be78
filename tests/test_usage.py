"""One usage count for a reply: /chat and the OpenAI routes share web.generation.usage_of."""

from __future__ import annotations


def test_usage_of_is_one_reply_count_for_chat_and_the_openai_routes():
    from types import SimpleNamespace

    from nanopipe.web import chat, openai
    assert chat.usage_of is openai.usage_of
    gen = SimpleNamespace(prompt=[1, 2, 3, 4], n_tokens=2)
    assert openai.usage_of({}, gen) == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6,
                                        "prompt_tokens_details": {"cached_tokens": 0}}
    assert openai.usage_of({"prompt_ids": [7, 8, 9], "cached_tokens": 2}, gen) == {
        "prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5, "prompt_tokens_details": {"cached_tokens": 2}}
