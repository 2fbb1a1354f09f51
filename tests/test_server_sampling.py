"""Sampling defaults belong to the served model: `serve --temperature/--top-p/--seed` are what a request that
names none gets (both APIs), and a request's own values win."""

from __future__ import annotations

from server_process import EXAMPLES, SUFFIX, chat_cli_answer, image_part

SERVE_ARGS = ("--temperature", "2", "--top-p", "0.95", "--seed", "7")
JOBS = [(image, q) for image in sorted(EXAMPLES.glob("*.png"))
        for q in ("Describe the image.", "How many shapes are there?" + SUFFIX)]


def ask_openai(client, image, question, **sampling) -> str:
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": [
        {"type": "text", "text": question}, image_part(image)]}], max_tokens=24, **sampling).choices[0].message.content


def ask_ollama(client, image, question, **options) -> str:
    return client.chat(model="m", options={"num_predict": 24, **options},
                       messages=[{"role": "user", "content": question, "images": [str(image)]}]).message.content


def test_a_request_without_sampling_gets_the_servers(openai_client, ollama_client):
    served = {"temperature": 2, "top_p": 0.95, "seed": 7}
    defaults = [ask_openai(openai_client, *job) for job in JOBS]
    assert defaults == [ask_openai(openai_client, *job, **served) for job in JOBS]
    assert [ask_ollama(ollama_client, *job) for job in JOBS] == [ask_ollama(ollama_client, *job, **served)
                                                                 for job in JOBS]
    greedy = [ask_openai(openai_client, *job, temperature=0) for job in JOBS]
    assert defaults != greedy  # the server's temperature did apply: seeded, so this does not flake


def test_a_requests_own_values_win(openai_client, ollama_client):
    image, question = JOBS[1]
    expected = chat_cli_answer(image, question)
    assert ask_openai(openai_client, image, question, temperature=0) == expected
    assert ask_ollama(ollama_client, image, question, temperature=0) == expected
    other_seed = [ask_openai(openai_client, *job, seed=8) for job in JOBS]
    assert other_seed != [ask_openai(openai_client, *job) for job in JOBS]
