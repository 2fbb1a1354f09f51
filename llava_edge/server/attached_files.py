"""Open WebUI's `<attached_files>` listing, taken out of a user message when the files it lists are the images
that came with that message: the model then sees the question the user asked, as `llava-edge chat` does.

With its default ("native") function calling, Open WebUI 0.12.4 starts each user message that has files with

    <attached_files>
    <file type="file" id="ID" url="ID" content_type="image/png" name="shapes.png"/>
    </attached_files>
    <blank line>

(a text part of its own in the OpenAI API, the start of `content` in Ollama's) for its tools to fetch the files
by id. The attributes come in that order; `url`, `content_type` and `name` may be missing, and no value is
escaped. Only that exact shape is recognised, and only its image entries (type "image", or an image/* content
type other than SVG: the files Open WebUI sends as images), when there are as many of them as images in the
message. Entries of other files stay, in the same shape; text that is not such a listing is never changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

OPEN, CLOSE = "<attached_files>\n", "\n</attached_files>\n\n"
# The name comes last and is not escaped: it runs to the line's closing `"/>`, quotes and all.
FILE_TAG = re.compile(r'<file type="(?P<kind>[^"\n]*)" id="[^"\n]*"(?: url="[^"\n]*")?'
                      r'(?: content_type="(?P<content_type>[^"\n]*)")?(?: name="[^\n]*")?/>')


@dataclass
class Stripped:
    listing: str  # what is left of the listing: "" when it listed only the images, else their entries taken out
    rest: str  # the text after it
    n_dropped: int  # listing entries taken out (0: nothing was, and `rest` is the whole text)

    @property
    def text(self) -> str:
        return self.listing + self.rest


def is_image_entry(tag: re.Match) -> bool:
    """As Open WebUI decides which files it sends as images: type "image", or content type image/* but SVG."""
    base = (tag.group("content_type") or "").split(";")[0].strip().lower()
    return tag.group("kind") == "image" or (base.startswith("image/") and base != "image/svg+xml")


def strip_listing(text: str, n_images: int) -> Stripped:
    """`text` without a leading listing of this message's `n_images` images (what follows it is kept as is)."""
    unchanged = Stripped("", text, 0)
    if n_images < 1 or not text.startswith(OPEN):
        return unchanged
    end = text.find(CLOSE, len(OPEN))
    if end < 0:
        return unchanged
    lines = text[len(OPEN):end].split("\n")
    tags = [FILE_TAG.fullmatch(line) for line in lines]
    if not all(tags):
        return unchanged
    kept = [line for line, tag in zip(lines, tags) if not is_image_entry(tag)]
    n_dropped = len(lines) - len(kept)
    if n_dropped != n_images:
        return unchanged
    return Stripped(OPEN + "\n".join(kept) + CLOSE if kept else "", text[end + len(CLOSE):], n_dropped)
