-- wrk script: POST /embed with one 14-token sentence.
wrk.method = "POST"
wrk.body = '{"inputs": "The quick brown fox jumps over the lazy dog near the river bank."}'
wrk.headers["Content-Type"] = "application/json"
