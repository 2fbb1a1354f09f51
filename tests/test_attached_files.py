"""Open WebUI's <attached_files> listing: taken out only in the shape Open WebUI emits and only for the
message's own images; any other text stays as it came."""

import json
from pathlib import Path

import pytest

from llava_edge.server.attached_files import strip_listing

DATA = Path(__file__).parent / "data" / "openwebui"
# The listing as Open WebUI 0.12.4 sent it (recorded), for one PNG
RECORDED = json.loads((DATA / "openai_chat_1.json").read_text())["messages"][0]["content"][0]["text"]
PNG = RECORDED.split("\n")[1]
PDF = '<file type="file" id="d1" url="d1" content_type="application/pdf" name="notes.pdf"/>'


def listing(*tags: str) -> str:
    return "<attached_files>\n" + "\n".join(tags) + "\n</attached_files>\n\n"


def test_the_recorded_listing_of_the_message_image_goes():
    assert RECORDED == listing(PNG) and 'content_type="image/png"' in PNG
    stripped = strip_listing(RECORDED, 1)
    assert (stripped.listing, stripped.rest, stripped.n_dropped) == ("", "", 1)
    assert strip_listing(RECORDED + "Describe the image.", 1).text == "Describe the image."  # Ollama's content


@pytest.mark.parametrize("tag", [
    '<file type="image" id="a"/>',  # no url, no content type: an image by its type
    '<file type="file" id="a" url="a" content_type="image/jpeg; q=1"/>',
    '<file type="file" id="a" url="a" content_type="image/webp" name="my "best" shot.webp"/>',  # unescaped quotes
])
def test_image_entries_in_every_shape_open_webui_writes(tag):
    assert strip_listing(listing(tag) + "Q", 1).text == "Q"


def test_entries_of_other_files_stay_in_the_same_shape():
    stripped = strip_listing(listing(PDF, PNG) + "Q", 1)
    assert stripped.text == listing(PDF) + "Q" and stripped.n_dropped == 1


@pytest.mark.parametrize("text, n_images", [
    (listing(PNG) + "Q", 0),  # the listed image did not come with the message
    (listing(PNG, PNG) + "Q", 1),  # more images listed than came
    (listing(PNG) + "Q", 2),  # fewer listed than came: not Open WebUI's listing of them
    (listing('<file type="file" id="s" url="s" content_type="image/svg+xml" name="x.svg"/>') + "Q", 1),  # SVG
    (listing(PDF) + "Q", 1),
    ("Q\n" + listing(PNG), 1),  # not leading
    (listing(PNG).replace("\n\n", "\n") + "Q", 1),  # not the exact shape (one line break after the close)
    (listing(PNG.replace(' id="', ' id ="')) + "Q", 1),
    (listing(PNG + " ") + "Q", 1),
    ("<attached_files>\nwhat is this?\n</attached_files>\n\nQ", 1),
    ("What does <attached_files> mean?", 1),
])
def test_anything_else_is_kept_as_it_came(text, n_images):
    stripped = strip_listing(text, n_images)
    assert stripped.text == text and stripped.n_dropped == 0
