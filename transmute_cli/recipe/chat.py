"""Chat recipes: the instruction is a system message, each example a conversation, both rendered
through the tokenizer's own chat template.

The engine wants ``system + x`` (contextual pass) and ``plain + x`` (non-contextual pass) with
the same tokens x.  The chat template renders the conversation with the system message and
without one (then the template's default system prompt, a BOS, or nothing: what a user who sends
no system prompt gets, so what the patched model must act on).  x is the longest common tail of
the two renderings, starting no earlier than the end of the system message's text and no later
than the first user message: for ChatML templates (SmolLM2, Qwen) the system turn's closing token
and then every turn, the last answer with its end-of-turn token.  A template that merges the
system message into the first user turn (Gemma's) aligns on the user's words.  A template that
renders the turns differently with and without a system message cannot be patched position by
position, and is refused with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from os.path import commonprefix

from transmute_cli.recipe.datafiles import Pair
from transmute_cli.errors import InputError
from transmute_cli.model.tokens import token_ids


@dataclass(frozen=True)
class Positions:
    """How much each part of a chat example's x counts in the fit (``ChatFormat.token_weights``):
    ``lead``, the tokens before the first user message's words (the system turn's closing token
    and the user turn's header); ``turns``, the rest before the fitted answer (user turns, earlier
    answers, the assistant header); ``first``, the answer's first ``first_tokens`` tokens; 1, the
    rest of the answer with its end-of-turn token."""

    lead: float = 1.0
    turns: float = 1.0
    first: float = 1.0
    first_tokens: int = 0

    @property
    def uniform(self) -> bool:
        return self.lead == self.turns == 1.0 and (self.first == 1.0 or self.first_tokens == 0)


# a conversation to find where the turns start (any text will do; checked on every real one)
_PROBE = [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]


@dataclass(frozen=True)
class ChatFormat:
    """Where the turns start with and without the system message (see the module doc)."""

    system_message: str
    system: str  # rendered text before the turns, with the system message
    plain: str  # rendered text before the turns without a system message
    tokenizer: object = field(repr=False, compare=False)

    def turns(self, messages: list[dict], generation_prompt: bool = False, *, where: str = "examples") -> str:
        """The turns as the template renders them after the prefix: the same text with and without
        the system message, and the same tokens after either prefix as in the whole (checked)."""
        system = {"role": "system", "content": self.system_message}
        full = render_messages(self.tokenizer, [system, *messages], generation_prompt)
        rest = full[len(self.system):]
        if not full.startswith(self.system) or render_messages(self.tokenizer, messages,
                                                               generation_prompt) != self.plain + rest:
            raise InputError("the model's chat template renders this conversation differently with and without "
                             "the system message, so its turns cannot be aligned", field=where)
        if not _splits(self.tokenizer, self.system, rest) or not _splits(self.tokenizer, self.plain, rest):
            raise InputError("the conversation does not tokenize the same after the system prompt as in the "
                             "whole text (the chat template joins them inside a token)", field=where)
        return rest

    def texts(self, pairs: Sequence[Pair], *, answer: bool, where: str) -> list[str]:
        """Each pair's conversation, with its answer (patch texts) or ending where the assistant's
        answer starts (queries)."""
        texts = [self.turns(p.messages(answer), generation_prompt=not answer, where=f"{where}[{i}]")
                 for i, p in enumerate(pairs)]
        if answer:  # an open answer (cut at the cap) ends at its last token: no end-of-turn after it
            texts = [_open(t, p.output, f"{where}[{i}]") if p.open else t for i, (t, p) in enumerate(zip(texts, pairs))]
        return texts

    def token_weights(self, pairs: Sequence[Pair], texts: Sequence[str], positions: Positions) -> list[list[float]]:
        """Per patch text (``texts(pairs, answer=True)``), one weight per token (``Positions``)."""
        out = []
        for i, (p, x) in enumerate(zip(pairs, texts)):
            ids = token_ids(self.tokenizer, x)
            asked = p.messages(False)
            query = self.turns(asked, generation_prompt=True, where=f"examples[{i}]")
            # how many leading tokens x shares with its text up to the first user words, and with the query
            lead = len(commonprefix([ids, token_ids(self.tokenizer, x[: max(x.find(asked[0]["content"]), 0)])]))
            start = len(commonprefix([ids, token_ids(self.tokenizer, query)]))
            w = [positions.lead] * lead + [positions.turns] * (start - lead) + [1.0] * (len(ids) - start)
            for t in range(start, min(start + positions.first_tokens, len(ids))):
                w[t] = positions.first
            out.append(w)
        return out


def _open(text: str, answer: str, where: str) -> str:
    """``text`` cut right after the last answer's own words (what the template writes after them,
    the end-of-turn token, goes)."""
    end = text.rfind(answer.rstrip())
    if end < 0:
        raise InputError("the chat template rewrites this answer, so an open (cut) answer cannot be ended at its "
                         "last token", field=where)
    return text[: end + len(answer.rstrip())]


def _splits(tokenizer, head: str, rest: str) -> bool:
    return token_ids(tokenizer, head) + token_ids(tokenizer, rest) == token_ids(tokenizer, head + rest)


def render_messages(tokenizer, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_format(tokenizer, system_message: str, *, model: str = "the model") -> ChatFormat:
    """The two prefixes of ``system_message`` under ``tokenizer``'s chat template; an
    ``InputError`` (field ``chat``) when the tokenizer has none or it cannot be split.

    The turns start where the renderings with and without the system message stop differing
    (their longest common tail), no earlier than the end of the system message and no later
    than the first user message, at the first such place where the tokens split cleanly."""
    if not has_chat_template(tokenizer):
        raise InputError(f"{model} has no chat template in its tokenizer (chat: true needs an instruction-tuned "
                         "model's tokenizer)", field="chat")
    system = {"role": "system", "content": system_message}
    try:
        with_system = render_messages(tokenizer, [system, *_PROBE])
        without = render_messages(tokenizer, _PROBE)
    except Exception as e:  # noqa: BLE001 - a template's own refusal (jinja raise_exception)
        raise InputError(f"{model}'s chat template refuses a system message ({' '.join(str(e).split())[:120]})",
                         field="chat") from None
    at = with_system.find(system_message)
    first = with_system.find(_PROBE[0]["content"], max(at, 0) + len(system_message))
    if at < 0 or first < 0:
        raise InputError(f"{model}'s chat template does not render the system message before the turns",
                         field="chat")
    common = 0
    while common < min(len(with_system), len(without)) and with_system[-1 - common] == without[-1 - common]:
        common += 1
    for start in range(max(len(with_system) - common, at + len(system_message)), first + 1):
        tail = len(with_system) - start
        if tail > common:
            break
        fmt = ChatFormat(system_message, with_system[:start], without[: len(without) - tail], tokenizer)
        try:
            fmt.turns(_PROBE, where="chat")
        except InputError:
            continue
        return fmt
    raise InputError(f"{model}'s chat template renders the turns differently with and without a system message",
                     field="chat")
