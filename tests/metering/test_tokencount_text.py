"""prompt_text: the text a prompt's tokens are counted from, for any body a client can send."""

from __future__ import annotations

from metering.tokencount import prompt_text


def test_content_parts_whose_text_is_not_a_string_are_skipped() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": True},
                    {"type": "text", "text": "hi"},
                    {"type": "image_url", "text": 3},
                ],
            }
        ]
    }
    assert "hi" in prompt_text("chat.completions", body)
