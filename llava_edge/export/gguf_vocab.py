"""The SentencePiece vocab and chat template as llama.cpp's `llama` tokenizer reads them from a GGUF.

Token types come straight from the SentencePiece model proto (its piece types use the same numbers as
gguf's TokenType). Rows of the embedding table beyond the SentencePiece model (llava-hf's `<image>`,
`<pad>`, padding to a multiple of 64) become the added tokens, and `[PAD{i}]` for the rest, as
llama.cpp's convert_hf_to_gguf.py writes them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFWriter, TokenType

from ..conversation import IMAGE_TOKEN, TEMPLATES, Template
from ..errors import CheckpointError

UNUSED_SCORE = -10000.0  # llama.cpp's converter: score of a [PAD{i}] row
ADDED_SCORE = -1000.0  # and of an added token


@dataclass
class AddedToken:
    id: int
    content: str
    special: bool  # CONTROL (matched only when parsing specials) vs USER_DEFINED (always matched)


@dataclass
class Vocab:
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    bos_id: int
    eos_id: int
    unk_id: int
    pad_id: int | None
    add_space_prefix: bool
    n_sentencepiece: int  # rows that come from the SentencePiece model
    added: list[AddedToken] = field(default_factory=list)


def read_sentencepiece_vocab(
    tokenizer_path: Path,
    vocab_size: int,
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    added: list[AddedToken] | None = None,
) -> Vocab:
    """The vocab for an embedding table of `vocab_size` rows (>= the SentencePiece model's size)."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(Path(tokenizer_path).read_bytes())
    except Exception as e:  # noqa: BLE001 - OSError, or protobuf's DecodeError
        raise CheckpointError(f"{tokenizer_path}: not a readable SentencePiece model ({e})") from None
    n_sp = len(proto.pieces)
    if n_sp == 0:
        raise CheckpointError(f"{tokenizer_path}: SentencePiece model has no pieces")
    if vocab_size < n_sp:
        raise CheckpointError(
            f"{tokenizer_path}: {n_sp} tokens, more than the model's {vocab_size} embedding rows"
        )
    if proto.normalizer_spec.remove_extra_whitespaces:
        warnings.warn(
            f"{tokenizer_path}: remove_extra_whitespaces is on; llama.cpp's SPM tokenizer keeps runs of spaces, "
            "so its token ids will differ on such text", stacklevel=2,
        )

    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [UNUSED_SCORE] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for i, piece in enumerate(proto.pieces):
        tokens[i] = piece.piece.encode("utf-8")
        scores[i] = piece.score
        types[i] = int(piece.type)  # NORMAL=1 UNKNOWN=2 CONTROL=3 USER_DEFINED=4 UNUSED=5 BYTE=6, as gguf
    added = [a for a in (added or []) if a.id >= n_sp]
    for a in added:
        if a.id >= vocab_size:
            raise CheckpointError(f"added token {a.content!r} has id {a.id}, beyond {vocab_size} embedding rows")
        tokens[a.id] = a.content.encode("utf-8")
        scores[a.id] = ADDED_SCORE
        types[a.id] = int(TokenType.CONTROL if a.special else TokenType.USER_DEFINED)

    spec = proto.trainer_spec
    bos = spec.bos_id if bos_id is None else bos_id
    eos = spec.eos_id if eos_id is None else eos_id
    for what, i in (("bos", bos), ("eos", eos), ("unk", spec.unk_id)):
        if not 0 <= i < vocab_size:
            raise CheckpointError(f"{tokenizer_path}: {what} id {i} is outside the vocab")
    if pad_id is not None and not 0 <= pad_id < vocab_size:
        pad_id = None
    return Vocab(
        tokens, scores, types, bos, eos, spec.unk_id, pad_id,
        add_space_prefix=proto.normalizer_spec.add_dummy_prefix, n_sentencepiece=n_sp, added=added,
    )


def added_tokens_from_dir(ckpt_dir: Path) -> list[AddedToken]:
    """Added tokens declared next to a Hugging Face tokenizer (tokenizer_config.json, added_tokens.json)."""
    found: dict[int, AddedToken] = {}
    added_json = Path(ckpt_dir) / "added_tokens.json"
    if added_json.is_file():
        for content, i in json.loads(added_json.read_text()).items():
            found[int(i)] = AddedToken(int(i), content, special=_looks_special(content))
    config = Path(ckpt_dir) / "tokenizer_config.json"
    if config.is_file():
        for i, data in (json.loads(config.read_text()).get("added_tokens_decoder") or {}).items():
            content = data["content"]
            found[int(i)] = AddedToken(int(i), content, special=bool(data.get("special")) or _looks_special(content))
    return sorted(found.values(), key=lambda a: a.id)


def llava_hf_added_tokens(image_token_id: int, pad_id: int | None) -> list[AddedToken]:
    """What llava-hf's tokenizer adds on top of LLaMA's 32000 pieces, when no tokenizer_config says it."""
    out = [AddedToken(image_token_id, IMAGE_TOKEN, special=True)]
    if pad_id is not None and pad_id != image_token_id:
        out.append(AddedToken(pad_id, "<pad>", special=True))
    return out


def _looks_special(token: str) -> bool:
    return token.startswith("<") and token.endswith(">") and len(token) > 2


def write_vocab(writer: GGUFWriter, vocab: Vocab, template: str | Template | None) -> None:
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_unk_token_id(vocab.unk_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if template is not None:
        writer.add_chat_template(chat_template_jinja(template))


def chat_template_jinja(template: str | Template) -> str:
    """A Jinja chat template that renders `bos_token` + `conversation.render_prompt`.

    It starts with `{{ bos_token }}` as Hugging Face LLaMA templates do: llama.cpp strips a leading BOS
    from the rendered text before its tokenizer adds one, and llama-cpp-python tokenizes the rendered
    text without adding one, so both get exactly one BOS. A message's content is a string, or a list of
    parts where each {"type": "image"|"image_url"} part puts the template's image prefix before the text.
    """
    tpl = TEMPLATES[template] if isinstance(template, str) else template
    user, assistant = tpl.roles

    def lit(s: str) -> str:  # a Jinja string literal (JSON escapes are valid there)
        return json.dumps(s)

    user_prefix = lit(user + ": " if user else "")
    assistant_prefix = lit(assistant + ": " if assistant else "")
    generation = lit(assistant + ":" if assistant else "")
    return (
        "{{ bos_token }}"
        "{%- set ns = namespace(system=" + lit(tpl.system) + ") -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'system' -%}{%- set ns.system = m['content'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- if ns.system -%}{{ ns.system }}" "{{ " + lit(tpl.sep) + " }}{%- endif -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] != 'system' -%}"
        "{%- set ns.text = '' -%}"
        "{%- if m['content'] is string -%}{%- set ns.text = m['content'] -%}"
        "{%- else -%}"
        "{%- for part in m['content'] -%}"
        "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
        "{%- set ns.text = " + lit(tpl.image_prefix) + " ~ ns.text -%}"
        "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text ~ part['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- endif -%}"
        "{%- if m['role'] == 'user' -%}{{ " + user_prefix + " ~ ns.text ~ " + lit(tpl.sep) + " }}"
        "{%- else -%}{{ " + assistant_prefix + " ~ ns.text ~ " + lit(tpl.sep2) + " }}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + generation + " }}{%- endif -%}"
    )
