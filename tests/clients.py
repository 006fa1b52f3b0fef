#!/usr/bin/env python3
"""Real, unmodified clients against the running example server.

The official `openai` SDK (`/v1/embeddings`, `/v1/models`) and
`huggingface_hub`'s `InferenceClient.feature_extraction` (the TEI client)
must get the same vectors as `POST /embed`, to 1e-5. Run by tests/serve.rs:

    python3 tests/clients.py --port 8080 --model all-MiniLM-L6-v2

Exits non-zero with a message on the first mismatch. Loopback only.
"""

import argparse
import json
import math
import sys
import urllib.request

import huggingface_hub
import openai

TEXTS = ["What is deep learning?", "Deep learning is a subfield of machine learning."]


def post(port, path, body):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def close(a, b, what):
    a, b = [float(x) for x in a], [float(x) for x in b]
    if len(a) != len(b):
        sys.exit(f"{what}: lengths {len(a)} and {len(b)}")
    worst = max(abs(x - y) for x, y in zip(a, b))
    if worst > 1e-5:
        sys.exit(f"{what}: differs by {worst}")


def unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def expect_error(call, error_type, what):
    try:
        call()
    except error_type as err:
        status = getattr(err, "status_code", None) or getattr(
            getattr(err, "response", None), "status_code", None
        )
        if status is None or not 400 <= status < 500:
            sys.exit(f"{what}: status {status}, not a 4xx")
        return err
    sys.exit(f"{what}: no {error_type.__name__} raised")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    reference = post(args.port, "/embed", {"inputs": TEXTS})

    # The OpenAI SDK, with its defaults: it asks for base64 and decodes it.
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused")
    models = [m.id for m in client.models.list()]
    if models != [args.model]:
        sys.exit(f"/v1/models lists {models}")
    response = client.embeddings.create(model=args.model, input=TEXTS)
    for got, want in zip(response.data, reference):
        close(got.embedding, want, "openai default (base64)")
    if response.usage.prompt_tokens <= 0 or response.usage.total_tokens != response.usage.prompt_tokens:
        sys.exit(f"usage: {response.usage}")
    floats = client.embeddings.create(model=args.model, input=TEXTS[0], encoding_format="float")
    close(floats.data[0].embedding, reference[0], "openai float")
    short = client.embeddings.create(model=args.model, input=TEXTS[0], dimensions=64)
    close(short.data[0].embedding, unit(reference[0][:64]), "openai dimensions=64")
    ids = post(args.port, "/tokenize", {"inputs": TEXTS[0]})[0]
    by_ids = client.embeddings.create(model=args.model, input=[[t["id"] for t in ids]])
    close(by_ids.data[0].embedding, reference[0], "openai token ids")
    expect_error(
        lambda: client.embeddings.create(model="text-embedding-3-small", input="x"),
        openai.NotFoundError,
        "openai wrong model",
    )
    expect_error(
        lambda: client.embeddings.create(model=args.model, input="x", dimensions=100_000),
        openai.BadRequestError,
        "openai dimensions too large",
    )
    expect_error(
        lambda: client.embeddings.create(model=args.model, input=[]),
        openai.APIStatusError,
        "openai empty input",
    )

    # The TEI client of huggingface_hub.
    tei = huggingface_hub.InferenceClient(model=f"http://127.0.0.1:{args.port}")
    vectors = tei.feature_extraction(TEXTS[0])
    close(list(vectors.reshape(-1)), reference[0], "huggingface_hub feature_extraction")
    raw = tei.feature_extraction(TEXTS[0], normalize=False)
    raw_reference = post(args.port, "/embed", {"inputs": TEXTS[0], "normalize": False})[0]
    close(list(raw.reshape(-1)), raw_reference, "huggingface_hub normalize=False")
    long_text = " ".join(["word"] * 600)
    for direction in ("Left", "Right"):
        got = tei.feature_extraction(long_text, truncate=True, truncation_direction=direction)
        want = post(
            args.port,
            "/embed",
            {"inputs": long_text, "truncate": True, "truncation_direction": direction},
        )[0]
        close(list(got.reshape(-1)), want, f"huggingface_hub truncation_direction={direction}")
    print("ok: openai", openai.__version__, "and huggingface_hub", huggingface_hub.__version__)


if __name__ == "__main__":
    main()
