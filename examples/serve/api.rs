//! The HTTP API: text-embeddings-inference compatible `POST /embed`, `/info`,
//! and one JSON error shape for every failure.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use candlewick::error::{Overloaded, status_code};
use candlewick::{BoxError, Serving, ServingConfig};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::bert::{BertLoader, EncodeError, TextEncoder, normalize};

/// The largest request body accepted (413 above).
pub(crate) const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    serving: Serving<Vec<u32>, Vec<f32>>,
    encoder: TextEncoder,
    max_client_batch: usize,
    /// The static part of `/info`.
    info: Arc<Value>,
}

impl AppState {
    pub(crate) fn new(
        serving: Serving<Vec<u32>, Vec<f32>>,
        loader: &BertLoader,
        config: &ServingConfig,
        max_client_batch: usize,
    ) -> Self {
        let model = serving.model();
        let encoder = loader.encoder();
        let batch = &config.batch;
        let info = json!({
            "model": {
                "name": model.name,
                "version": model.version,
                "revision": model.revision,
                "approval": model.approval.as_str(),
                "dimension": loader.dimension(),
                "max_input_tokens": encoder.max_tokens(),
                "pooling": format!("{:?}", loader.pooling()).to_lowercase(),
                "normalized_by_default": loader.wants_normalization(),
            },
            "devices": config.pool.devices.iter().map(|d| candlewick::device::format_location(*d)).collect::<Vec<_>>(),
            "replicas_per_device": config.pool.replicas_per_device,
            "cpu_threads_per_replica": config.pool.cpu_threads_per_replica,
            // What candle computes at, and what a mismatch costs.
            "candle_cpu_threads": candlewick::device::candle_cpu_threads(),
            "cpu_threads_warning": serving
                .replicas()
                .iter()
                .find_map(|replica| replica.cpu_threads.and_then(|t| t.warning())),
            "batching": {
                "max_batch_size": batch.max_batch_size,
                "max_batch_tokens": batch.max_batch_cost,
                "max_wait_us": batch.max_wait.as_micros(),
            },
            "admission": {
                "queue_capacity": batch.queue_capacity,
                "policy": format!("{:?}", batch.admission).to_lowercase(),
                "max_queue_time_ms": batch.max_queue_time.map(|t| t.as_millis()),
                "request_timeout_ms": batch.default_timeout.map(|t| t.as_millis()),
                "max_client_batch": max_client_batch,
            },
        });
        Self {
            encoder,
            serving,
            max_client_batch,
            info: Arc::new(info),
        }
    }
}

/// The body of `POST /embed`, as text-embeddings-inference takes it.
#[derive(Debug, Deserialize)]
struct EmbedRequest {
    inputs: Inputs,
    #[serde(default = "yes")]
    normalize: bool,
    #[serde(default)]
    truncate: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Inputs {
    One(String),
    Many(Vec<String>),
}

/// `POST /embed`: one embedding per input, in order. Each input of a client
/// batch is its own request to the batcher, so each counts toward admission.
pub(crate) async fn embed(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<Vec<f32>>>, ApiError> {
    let body = body.map_err(|rejection| {
        if caused_by::<tower_http::timeout::TimeoutError>(&rejection) {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the request body stopped arriving",
            );
        }
        let kind = match rejection.status() {
            StatusCode::PAYLOAD_TOO_LARGE => "too_large",
            _ => "malformed",
        };
        ApiError::new(rejection.status(), kind, rejection.body_text())
    })?;
    let request: EmbedRequest = serde_json::from_slice(&body).map_err(ApiError::from_json)?;
    let texts = match request.inputs {
        Inputs::One(text) => vec![text],
        Inputs::Many(texts) => texts,
    };
    if texts.is_empty() {
        return Err(ApiError::validation("`inputs` is empty"));
    }
    if texts.len() > state.max_client_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "{} inputs in one request; the most is {}",
                texts.len(),
                state.max_client_batch
            ),
        ));
    }
    let mut sequences = Vec::with_capacity(texts.len());
    for text in &texts {
        if text.trim().is_empty() {
            return Err(ApiError::validation("an input is empty"));
        }
        sequences.push(
            state
                .encoder
                .encode(text, request.truncate)
                .map_err(ApiError::from_encode)?,
        );
    }
    // The first failure answers the request at once; dropping the others
    // (as when the client goes away) cancels what is still queued.
    let mut embeddings = futures_util::future::try_join_all(
        sequences.into_iter().map(|ids| state.serving.infer(ids)),
    )
    .await
    .map_err(ApiError::from_serving)?;
    if request.normalize {
        embeddings
            .iter_mut()
            .for_each(|embedding| normalize(embedding));
    }
    Ok(Json(embeddings))
}

/// `GET /info`: the model, devices, batching and admission settings, health.
pub(crate) async fn info(State(state): State<AppState>) -> Json<Value> {
    let mut info = (*state.info).clone();
    info["health"] = json!(state.serving.health().report().state.as_str());
    Json(info)
}

pub(crate) async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

/// An error answered as `{"error": …, "error_type": …}` with its status.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "validation", message)
    }

    fn from_json(err: serde_json::Error) -> Self {
        use serde_json::error::Category;
        match err.classify() {
            Category::Syntax | Category::Eof | Category::Io => Self::new(
                StatusCode::BAD_REQUEST,
                "malformed",
                format!("malformed JSON: {err}"),
            ),
            Category::Data => Self::validation(format!("invalid request: {err}")),
        }
    }

    fn from_encode(err: EncodeError) -> Self {
        match err {
            EncodeError::TooLong { .. } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("{err}; send `\"truncate\": true` to cut it"),
            ),
            err => Self::validation(err.to_string()),
        }
    }

    fn from_serving(err: BoxError) -> Self {
        let status =
            StatusCode::from_u16(status_code(&*err)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = match status.as_u16() {
            429 => "overloaded",
            422 => "validation",
            503 => "unavailable",
            504 => "deadline",
            _ => "model",
        };
        let mut error = Self::new(status, kind, err.to_string());
        error.retry_after = err
            .downcast_ref::<Overloaded>()
            .map(Overloaded::retry_after_secs);
        error
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.message, "error_type": self.kind }));
        let mut response = (self.status, body).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Whether `err` or one of its sources is an `E`.
fn caused_by<E: std::error::Error + 'static>(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(err);
    while let Some(err) = next {
        if err.is::<E>() {
            return true;
        }
        next = err.source();
    }
    false
}
