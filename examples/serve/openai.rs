//! The OpenAI embeddings API, as the official SDKs call it:
//! `POST /v1/embeddings` and `GET /v1/models`, with OpenAI's error shape.

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::api::{ApiError, AppState, Encoding, Inputs, json_error, parse_json, read_body};
use crate::bert::normalize;

/// The body of `POST /v1/embeddings`.
#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    input: Inputs,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    /// Accepted and ignored, as OpenAI documents it for abuse monitoring.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// What `POST /v1/embeddings` asked for, checked and tokenized.
struct Prepared {
    sequences: Vec<Vec<u32>>,
    base64: bool,
    dimensions: usize,
}

/// `POST /v1/embeddings`: unit-length embeddings, as floats or as base64 of
/// little-endian `f32`s (the SDKs' default), optionally cut to `dimensions`
/// and normalized again (Matryoshka), with token usage. A client batch is
/// admitted or refused as one.
pub(crate) async fn embeddings(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, OpenAiError> {
    let deadline = state.deadline(&headers)?;
    let body = read_body(body)?;
    let reservation = state.reserve().await?;
    let (
        reservation,
        Prepared {
            sequences,
            base64,
            dimensions,
        },
    ) = state
        .prepare_reserved(reservation, move |state| prepare(state, &body))
        .await?;
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    // Admission checks token ids (length, vocabulary): also the input's fault.
    let embeddings = state
        .embed(reservation, sequences, deadline)
        .await
        .map_err(|err| OpenAiError::from(err).with_param("input"))?;
    let data: Vec<Value> = embeddings
        .into_iter()
        .enumerate()
        .map(|(index, mut embedding)| {
            embedding.truncate(dimensions);
            normalize(&mut embedding);
            let embedding = if base64 {
                let bytes: Vec<u8> = embedding.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(embedding)
            };
            json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(json!({
        "object": "list",
        "data": data,
        "model": &*state.model_name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    })))
}

/// Parses, checks and tokenizes a `POST /v1/embeddings` body (on a
/// preparation thread).
fn prepare(state: &AppState, body: &[u8]) -> Result<Prepared, OpenAiError> {
    let request: EmbeddingsRequest = parse_json(body)?;
    if let Some(model) = &request.model
        && model.as_str() != &*state.model_name
    {
        return Err(OpenAiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{model}` does not exist; this server serves `{}`",
                state.model_name
            ),
            param: Some("model"),
            code: "model_not_found",
            retry_after: None,
        });
    }
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(OpenAiError::invalid(
                format!("encoding_format must be `float` or `base64`, not `{other}`"),
                "encoding_format",
            ));
        }
    };
    let dimensions = match request.dimensions {
        None => state.dimension,
        Some(n) if (1..=state.dimension).contains(&n) => n,
        Some(n) => {
            return Err(OpenAiError::invalid(
                format!(
                    "dimensions must be between 1 and the model's {}, not {n}",
                    state.dimension
                ),
                "dimensions",
            ));
        }
    };
    let how = Encoding {
        truncate: None,
        prompt: None,
    };
    let sequences = state
        .encode(request.input.into_vec(), &how)
        .map_err(|err| OpenAiError::from(err).with_param("input"))?;
    Ok(Prepared {
        sequences,
        base64,
        dimensions,
    })
}

/// `GET /v1/models`: the one model served.
pub(crate) async fn models(State(state): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": &*state.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "candlewick",
        }],
    }))
}

/// An error in OpenAI's shape:
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub(crate) struct OpenAiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    code: &'static str,
    retry_after: Option<u64>,
}

impl OpenAiError {
    fn invalid(message: String, param: &'static str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message,
            param: Some(param),
            code: "invalid_value",
            retry_after: None,
        }
    }

    /// Names `param` as the cause of a client error (not of a 429).
    fn with_param(mut self, param: &'static str) -> Self {
        if self.status.is_client_error() && self.status != StatusCode::TOO_MANY_REQUESTS {
            self.param = Some(param);
        }
        self
    }
}

/// The same failure the TEI endpoints report, in OpenAI's words: OpenAI
/// answers bad input with 400 whatever is wrong with it (the SDKs raise
/// `BadRequestError`), so TEI's 413 and 422 become 400.
impl From<ApiError> for OpenAiError {
    fn from(err: ApiError) -> Self {
        let status = match err.status {
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::UNPROCESSABLE_ENTITY => {
                StatusCode::BAD_REQUEST
            }
            status => status,
        };
        Self {
            status,
            message: err.message,
            param: None,
            code: err.kind,
            retry_after: err.retry_after,
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }});
        json_error(self.status, body, self.retry_after)
    }
}
