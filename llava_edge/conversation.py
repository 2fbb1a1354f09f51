"""LLaVA's prompt templates, and the prompt -> token ids step around the <image> placeholder.

Runtime code: no torch, no transformers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from llava_edge.errors import UserError

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200


@dataclass(frozen=True)
class Template:
    """A LLaVA conversation template (LLaVA's SeparatorStyle.TWO and PLAIN, in one rendering rule).

    Rendering: `system + sep` (nothing when system is empty), then each message as "ROLE: text" followed by
    sep (user) or sep2 (assistant), and the open generation slot as "ROLE:". A template with empty roles
    writes the bare text. `image_prefix` goes before the first user text when the prompt has an image.
    """

    name: str
    system: str
    roles: tuple[str, str]
    sep: str
    sep2: str
    image_prefix: str


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

TEMPLATES: dict[str, Template] = {
    # LLaVA-1.5 instruction tuning and evaluation (conv_vicuna_v1).
    "vicuna_v1": Template("vicuna_v1", VICUNA_SYSTEM, ("USER", "ASSISTANT"), " ", "</s>", IMAGE_TOKEN + "\n"),
    # LLaVA stage-1 pretraining sample: "<image>" + caption + "\n" (preprocess_plain).
    "plain": Template("plain", "", ("", ""), "", "\n", IMAGE_TOKEN),
    # llava-hf chat template: "USER: <image>\n{text} ASSISTANT: {answer} USER: ..." (every text followed by " ").
    "llava_hf": Template("llava_hf", "", ("USER", "ASSISTANT"), " ", " ", IMAGE_TOKEN + "\n"),
}


def get_template(template: str | Template) -> Template:
    if isinstance(template, Template):
        return template
    if template not in TEMPLATES:
        raise UserError(f"unknown conversation template {template!r} (known: {', '.join(TEMPLATES)})")
    return TEMPLATES[template]


def stop_strings(template: str | Template) -> list[str]:
    """Text that ends an assistant answer besides EOS: the separator written after it (none for "</s>",
    which is the EOS token itself)."""
    tpl = get_template(template)
    if tpl.sep2 == "</s>":
        return []
    if tpl.sep2.strip():
        return [tpl.sep2]
    # A blank sep2 ("llava_hf"'s " ") cannot be a stop; the next user turn starting is.
    return [f"{tpl.roles[0]}:"] if tpl.roles[0] else [tpl.sep2]


def render_prompt(
    template: str | Template, turns: list[tuple[str, str | None]], image: bool = True
) -> str:
    """Render (user, assistant) turns; an assistant of None (last turn only) leaves the generation slot open."""
    tpl = get_template(template)
    if not turns:
        raise ValueError("render_prompt needs at least one turn")
    if any(answer is None for _, answer in turns[:-1]):
        raise ValueError("only the last turn may have no assistant answer")

    user_role, assistant_role = tpl.roles
    prompt = tpl.system + tpl.sep if tpl.system else ""
    for i, (question, answer) in enumerate(turns):
        if image and i == 0:
            question = tpl.image_prefix + question
        prompt += _message(user_role, question) + tpl.sep
        if answer is None:
            prompt += assistant_role + ":" if assistant_role else ""
        else:
            prompt += _message(assistant_role, answer) + tpl.sep2
    return prompt


def render_messages(template: str | Template, messages: list[tuple[str, str, int]]) -> str:
    """Render chat messages (role, text, number of images) with the generation slot open after them.

    The way an API client sends a conversation: an optional leading "system" message (it replaces the
    template's system text), then "user" and "assistant" messages ending with a user one. A user message's
    images go where LLaVA puts them, the template's image prefix once per image before its text. With one
    image on the first question this is exactly `render_prompt(template, turns, image=True)`.
    """
    tpl = get_template(template)
    system = tpl.system
    if messages and messages[0][0] == "system":
        system, messages = messages[0][1], messages[1:]
    if not messages or messages[-1][0] != "user":
        raise UserError("the conversation must end with a user message")
    user_role, assistant_role = tpl.roles
    prompt = system + tpl.sep if system else ""
    for role, text, n_images in messages:
        if role == "user":
            prompt += _message(user_role, tpl.image_prefix * n_images + text) + tpl.sep
        elif role == "assistant":
            if n_images:
                raise UserError("images can only be in user messages")
            prompt += _message(assistant_role, text) + tpl.sep2
        elif role == "system":
            raise UserError("a system message can only come first")
        else:
            raise UserError(f"unknown message role {role!r} (expected system, user or assistant)")
    return prompt + (assistant_role + ":" if assistant_role else "")


def _message(role: str, text: str) -> str:
    return f"{role}: {text}" if role else text


def tokenize_prompt(
    prompt: str,
    encode: Callable[[str], list[int]],
    bos_id: int,
    image_token_id: int = IMAGE_TOKEN_INDEX,
    special_tokens: Mapping[str, int] | None = None,
) -> list[int]:
    """LLaVA's `tokenizer_image_token`: BOS once, then each text chunk between <image>s encoded on its own
    (so each gets SentencePiece's leading-space treatment), with `image_token_id` in between.

    `encode` must not add BOS. `special_tokens` (e.g. {"</s>": eos_id}) are cut out of the text and mapped to
    their ids, the text on either side encoded separately, as the Hugging Face Llama tokenizer LLaVA uses
    does; without it "</s>" would be encoded as the characters < / s >.
    """
    ids = [bos_id]
    for i, chunk in enumerate(prompt.split(IMAGE_TOKEN)):
        if i > 0:
            ids.append(image_token_id)
        ids.extend(_encode_with_specials(chunk, encode, special_tokens or {}))
    return ids


def _encode_with_specials(text: str, encode: Callable[[str], list[int]], specials: Mapping[str, int]) -> list[int]:
    pieces = [text]
    for token in specials:
        pieces = [part for piece in pieces for part in _split_keep(piece, token, specials)]
    ids: list[int] = []
    for piece in pieces:
        if piece in specials:
            ids.append(specials[piece])
        elif piece:
            ids.extend(encode(piece))
    return ids


def _split_keep(text: str, token: str, specials: Mapping[str, int]) -> list[str]:
    if text in specials:
        return [text]
    parts = text.split(token)
    out = [parts[0]]
    for part in parts[1:]:
        out += [token, part]
    return out
