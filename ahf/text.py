"""Text shared by every stage: the WritingPrompts detokenizer.

Fan et al.'s WritingPrompts files (and the pairs built from them) are tokenised: "[ WP ] I do n't
know , '' she said . <newline>". `detokenize` joins them back the way Reddit shows the text, so
that an index, a tagger or a model never sees the tokeniser's spacing.
"""

from __future__ import annotations

import re

_PROMPT_TAG = re.compile(r"\[\s*([A-Za-z]{2})\s*\]")
_SPACE_BEFORE = re.compile(r" ([.,!?;:%)\]}]|n't\b|'s\b|'re\b|'ve\b|'m\b|'ll\b|'d\b)")
_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def detokenize(text: str) -> str:
    """ "[ wp ] I do n't know , `` he said '' . <newline>" -> "[WP] I don't know, \\"he said\\"." """
    text = text.replace("<\\newline>", "\n").replace("<newline>", "\n")
    text = _PROMPT_TAG.sub(lambda m: f"[{m.group(1).upper()}]", text)
    text = re.sub(r"``\s*|\s*''", '"', text)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    text = re.sub(r"[ \t]*\n[ \t]*", "\n", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()
