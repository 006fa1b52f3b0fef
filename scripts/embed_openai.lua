-- wrk script: POST /v1/embeddings with one 14-token sentence, as the OpenAI
-- SDKs send it by default (encoding_format base64).
wrk.method = "POST"
wrk.body = '{"input": "The quick brown fox jumps over the lazy dog near the river bank.", "encoding_format": "base64"}'
wrk.headers["Content-Type"] = "application/json"
