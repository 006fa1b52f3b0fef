//! The HTTP API: text-embeddings-inference compatible `POST /embed`, `/info`,
//! and one JSON error shape for every failure.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use candlewick::batch::{Admission, Request, Reservation};
use candlewick::error::{DeadlineExceeded, InvalidInput, Overloaded, classify, find};
use candlewick::prepare::Preparer;
use candlewick::{BoxError, Serving, ServingConfig};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::ServiceExt as _;

use crate::bert::{BertLoader, Direction, EncodeError, TextEncoder, Token, normalize};
use crate::openai::OpenAiError;

/// The largest request body accepted (413 above).
pub(crate) const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// The request header in which a client gives how long it will wait, in
/// milliseconds: its inputs never reach the model after that. The server's
/// `--request-timeout-ms` is the most a client gets.
pub(crate) const TIMEOUT_HEADER: &str = "x-request-timeout-ms";

/// What every handler shares; cheap to clone into a preparation job.
#[derive(Clone)]
pub(crate) struct AppState(Arc<Shared>);

pub(crate) struct Shared {
    serving: Serving<Vec<u32>, Vec<f32>>,
    /// Parses and tokenizes requests off the runtime's workers.
    preparer: Preparer,
    encoder: TextEncoder,
    /// The served model's name, as `/v1/models` lists it.
    pub(crate) model_name: Arc<str>,
    /// The length of an embedding.
    pub(crate) dimension: usize,
    max_client_batch: usize,
    /// The static part of `/info`.
    info: Arc<Value>,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    pub(crate) fn new(
        serving: Serving<Vec<u32>, Vec<f32>>,
        preparer: Preparer,
        loader: &BertLoader,
        config: &ServingConfig,
        max_client_batch: usize,
    ) -> Self {
        let model = serving.model();
        let encoder = loader.encoder();
        let batch = &config.batch;
        let info = json!({
            "model_id": model.name,
            "version": env!("CARGO_PKG_VERSION"),
            "model": {
                "name": model.name,
                "version": model.version,
                "revision": model.revision,
                "approval": model.approval.as_str(),
                "dimension": loader.dimension(),
                "max_input_tokens": encoder.max_tokens(),
                "pooling": loader.pooling().as_str(),
                "prompts": loader.encoder().prompt_names(),
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
                "policy": match batch.admission {
                    Admission::Shed => "shed",
                    Admission::Wait => "wait",
                    _ => "other",
                },
                "max_queue_time_ms": batch.max_queue_time.map(|t| t.as_millis()),
                "request_timeout_ms": batch.default_timeout.map(|t| t.as_millis()),
                "max_client_batch": max_client_batch,
            },
        });
        Self(Arc::new(Shared {
            model_name: Arc::from(model.name.as_str()),
            dimension: loader.dimension(),
            encoder,
            serving,
            preparer,
            max_client_batch,
            info: Arc::new(info),
        }))
    }

    /// Room in the batcher's queue for one client request, taken before its
    /// body is parsed or tokenized: under overload, the 429 costs next to
    /// nothing. The request's real input count is claimed when it is queued.
    pub(crate) async fn reserve(&self) -> Result<Reservation<Vec<u32>, Vec<f32>>, ApiError> {
        self.serving
            .batch()
            .reserve(1)
            .await
            .map_err(ApiError::from_serving)
    }

    /// Runs `work` (parsing, tokenizing) on a preparation thread, never on
    /// the runtime's workers; a full preparation queue is a 429.
    pub(crate) async fn prepare<T, E>(
        &self,
        work: impl FnOnce(&AppState) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<ApiError> + Send + 'static,
    {
        let state = self.clone();
        self.preparer
            .run(move || work(&state))
            .await
            .map_err(|err| E::from(ApiError::from_serving(err)))?
    }

    /// [`prepare`](Self::prepare)s a request that holds `reservation`. A
    /// failure gives the room back and counts the request as refused in
    /// `candlewick_requests_total`, once (the one slot reserved before its
    /// inputs were known): with the preparer's own error (queue full, a
    /// panic, shut down), or as invalid input (every error `work` returns
    /// is the client's).
    pub(crate) async fn prepare_reserved<T, E>(
        &self,
        reservation: Reservation<Vec<u32>, Vec<f32>>,
        work: impl FnOnce(&AppState) -> Result<T, E> + Send + 'static,
    ) -> Result<(Reservation<Vec<u32>, Vec<f32>>, T), E>
    where
        T: Send + 'static,
        E: From<ApiError> + Send + 'static,
    {
        let state = self.clone();
        match self.preparer.run(move || work(&state)).await {
            Ok(Ok(prepared)) => Ok((reservation, prepared)),
            Ok(Err(err)) => {
                reservation.refuse(&InvalidInput::new("the request failed its preparation"));
                Err(err)
            }
            Err(err) => {
                reservation.refuse(&*err);
                Err(E::from(ApiError::from_serving(err)))
            }
        }
    }
}

/// The body of `POST /embed`, as text-embeddings-inference takes it.
#[derive(Debug, Deserialize)]
struct EmbedRequest {
    inputs: Inputs,
    #[serde(default = "yes")]
    normalize: bool,
    /// `null` (as clients that send every field write it) is `false`.
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    truncation_direction: Direction,
    #[serde(default)]
    prompt_name: Option<String>,
}

fn yes() -> bool {
    true
}

/// One input: a text, or the model's token ids, used as they are.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Input {
    Text(String),
    Ids(Vec<u32>),
}

/// One input or several (the shapes both APIs accept).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Inputs {
    One(Input),
    Many(Vec<Input>),
}

impl Inputs {
    pub(crate) fn into_vec(self) -> Vec<Input> {
        match self {
            Self::One(input) => vec![input],
            Self::Many(inputs) => inputs,
        }
    }
}

/// How to turn inputs into token ids.
pub(crate) struct Encoding<'a> {
    pub(crate) truncate: Option<Direction>,
    pub(crate) prompt: Option<&'a str>,
}

impl AppState {
    /// The token ids of every input, checked before anything is queued.
    pub(crate) fn encode(
        &self,
        inputs: Vec<Input>,
        how: &Encoding<'_>,
    ) -> Result<Vec<Vec<u32>>, ApiError> {
        if inputs.is_empty() {
            return Err(ApiError::validation("`inputs` is empty"));
        }
        self.check_client_batch(inputs.len())?;
        inputs
            .into_iter()
            .map(|input| match input {
                Input::Text(text) if text.trim().is_empty() => {
                    Err(ApiError::validation("an input is empty"))
                }
                Input::Ids(ids) if ids.is_empty() => Err(ApiError::validation("an input is empty")),
                Input::Text(text) => self
                    .encoder
                    .encode_prompted(how.prompt, &text, how.truncate)
                    .map_err(ApiError::from_encode),
                // Checked at admission by the loader (length, vocabulary).
                Input::Ids(_) if how.prompt.is_some() => Err(ApiError::validation(
                    "`prompt_name` applies to texts, not to token ids",
                )),
                Input::Ids(ids) => Ok(match how.truncate {
                    Some(direction) => direction.cut(ids, self.encoder.max_tokens()),
                    None => ids,
                }),
            })
            .collect()
    }

    /// A 413 for more inputs in one request than the server takes.
    fn check_client_batch(&self, inputs: usize) -> Result<(), ApiError> {
        if inputs > self.max_client_batch {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!(
                    "{inputs} inputs in one request; the most is {}",
                    self.max_client_batch
                ),
            ));
        }
        Ok(())
    }

    /// The text of the prompt `name`, or a 422 naming the ones there are.
    fn prompt(&self, name: Option<&str>) -> Result<Option<&str>, ApiError> {
        let Some(name) = name else { return Ok(None) };
        self.encoder.prompt(name).map(Some).ok_or_else(|| {
            let known = self.encoder.prompt_names();
            ApiError::validation(if known.is_empty() {
                format!("unknown prompt_name `{name}`: the model defines no prompts")
            } else {
                format!(
                    "unknown prompt_name `{name}`; the model defines: {}",
                    known.join(", ")
                )
            })
        })
    }

    /// When the request's answer stops being of use, counted from its
    /// arrival: after the client's [`TIMEOUT_HEADER`], at most the server's
    /// request timeout, or the server's. A deadline already past is a 504 at
    /// once, before any work.
    pub(crate) fn deadline(&self, headers: &HeaderMap) -> Result<Option<Instant>, ApiError> {
        let now = Instant::now();
        let server = self.serving.batch().config().default_timeout;
        let timeout = match headers.get(TIMEOUT_HEADER) {
            None => server,
            Some(value) => {
                let millis: u64 = value
                    .to_str()
                    .ok()
                    .and_then(|value| value.trim().parse().ok())
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "malformed",
                            format!("{TIMEOUT_HEADER} must be a whole number of milliseconds"),
                        )
                    })?;
                let client = Duration::from_millis(millis);
                Some(server.map_or(client, |server| server.min(client)))
            }
        };
        let Some(timeout) = timeout else {
            return Ok(None);
        };
        if timeout.is_zero() {
            return Err(ApiError::from_serving(DeadlineExceeded::new().into()));
        }
        // A timeout too long for an instant means no deadline at all.
        Ok(now.checked_add(timeout))
    }

    /// One embedding per sequence, in order, each due by `deadline`:
    /// admitted or refused as one, in the room `reservation` holds. The
    /// first failure answers the request at once; dropping it (as when the
    /// client goes away) cancels what is still queued.
    pub(crate) async fn embed(
        &self,
        reservation: Reservation<Vec<u32>, Vec<f32>>,
        sequences: Vec<Vec<u32>>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Vec<f32>>, ApiError> {
        let requests = sequences
            .into_iter()
            .map(|ids| match deadline {
                // The deadline travels with each request into the batcher.
                Some(deadline) => Request::new(ids).with_deadline(deadline),
                None => Request::new(ids),
            })
            .collect();
        // Through tower's interface: the reservation is a one-shot service
        // over the group, and each request carries its deadline.
        reservation
            .oneshot(requests)
            .await
            .map_err(ApiError::from_serving)
    }
}

/// The body as read, or the error for an oversized or stalled one.
pub(crate) fn read_body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if find::<tower_http::timeout::TimeoutError>(&rejection).is_some() {
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
    })
}

/// A JSON body, or the error for a malformed one.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(ApiError::from_json)
}

/// `POST /embed` (and `POST /`, where TEI clients send it): one embedding
/// per input, in order. A client batch is admitted or refused as one.
pub(crate) async fn embed(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<Vec<f32>>>, ApiError> {
    let deadline = state.deadline(&headers)?;
    let body = read_body(body)?;
    let reservation = state.reserve().await?;
    let (reservation, (sequences, unit_length)) = state
        .prepare_reserved(reservation, move |state| {
            let request: EmbedRequest = parse_json(&body)?;
            let how = Encoding {
                truncate: request
                    .truncate
                    .unwrap_or(false)
                    .then_some(request.truncation_direction),
                prompt: state.prompt(request.prompt_name.as_deref())?,
            };
            let sequences = state.encode(request.inputs.into_vec(), &how)?;
            Ok::<_, ApiError>((sequences, request.normalize))
        })
        .await?;
    let mut embeddings = state.embed(reservation, sequences, deadline).await?;
    if unit_length {
        embeddings
            .iter_mut()
            .for_each(|embedding| normalize(embedding));
    }
    Ok(Json(embeddings))
}

/// The body of `POST /tokenize`.
#[derive(Debug, Deserialize)]
struct TokenizeRequest {
    inputs: TextInputs,
    #[serde(default = "yes")]
    add_special_tokens: bool,
    #[serde(default)]
    prompt_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TextInputs {
    One(String),
    Many(Vec<String>),
}

/// `POST /tokenize`: the tokens of each input, with their character spans.
pub(crate) async fn tokenize(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Vec<Vec<Token>>>, ApiError> {
    let body = read_body(body)?;
    let tokens = state
        .prepare(move |state| {
            let request: TokenizeRequest = parse_json(&body)?;
            let prompt = state.prompt(request.prompt_name.as_deref())?;
            let texts = match request.inputs {
                TextInputs::One(text) => vec![text],
                TextInputs::Many(texts) => texts,
            };
            state.check_client_batch(texts.len())?;
            // At most what one request to /embed can carry: an answer is
            // some 70 bytes a token, so without a bound, a 2 MiB body of
            // one-character tokens would be answered with over 100 MB.
            let most = state
                .max_client_batch
                .saturating_mul(state.encoder.max_tokens());
            let mut total = 0usize;
            texts
                .iter()
                .map(|text| {
                    let text = format!("{}{text}", prompt.unwrap_or_default());
                    let tokens = state
                        .encoder
                        .tokenize(&text, request.add_special_tokens)
                        .map_err(ApiError::from_encode)?;
                    total = total.saturating_add(tokens.len());
                    if total > most {
                        return Err(ApiError::new(
                            StatusCode::PAYLOAD_TOO_LARGE,
                            "too_large",
                            format!(
                                "more than {most} tokens in one request (the most inputs in one \
                                 request times the model's most tokens in one input)"
                            ),
                        ));
                    }
                    Ok(tokens)
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await?;
    Ok(Json(tokens))
}

/// `GET /info`: the model, devices, batching and admission settings, health.
pub(crate) async fn info(State(state): State<AppState>) -> Json<Value> {
    let mut info = (*state.info).clone();
    info["health"] = json!(state.serving.health().report().state.as_str());
    Json(info)
}

/// No such route, in the error shape of the API the path belongs to.
pub(crate) async fn not_found(uri: Uri) -> Response {
    in_shape_of(
        &uri,
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route"),
    )
}

/// A route called with a method it does not take (`GET /embed`).
pub(crate) async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let message = format!("{} does not take {method}", uri.path());
    in_shape_of(
        &uri,
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "not_allowed", message),
    )
}

/// `err` in OpenAI's error shape under `/v1/`, in TEI's elsewhere.
pub(crate) fn in_shape_of(uri: &Uri, err: ApiError) -> Response {
    if uri.path().starts_with("/v1/") {
        OpenAiError::from(err).into_response()
    } else {
        err.into_response()
    }
}

/// An error answered as `{"error": …, "error_type": …}` with its status.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) kind: &'static str,
    pub(crate) message: String,
    pub(crate) retry_after: Option<u64>,
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

    /// The answer to a failure of the serving stack, from the crate's one
    /// table (`error::classify`): its status, and its outcome as the error
    /// type (TEI calls invalid input `validation`).
    fn from_serving(err: BoxError) -> Self {
        let class = classify(&*err);
        let kind = match (class.status, class.outcome) {
            (StatusCode::PAYLOAD_TOO_LARGE, _) => "too_large",
            (_, "invalid") => "validation",
            (_, outcome) => outcome,
        };
        let mut error = Self::new(class.status, kind, err.to_string());
        error.retry_after = err
            .downcast_ref::<Overloaded>()
            .map(Overloaded::retry_after_secs);
        error
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": self.message, "error_type": self.kind });
        json_error(self.status, body, self.retry_after)
    }
}

/// A JSON error response, with `Retry-After` when the client should retry.
///
/// A 503 (draining, or stopped for good) also says `Retry-After: 1` and
/// closes the connection: a kept-alive connection would bring the client's
/// retry back to this server, not to another one behind the same Service.
pub(crate) fn json_error(status: StatusCode, body: Value, retry_after: Option<u64>) -> Response {
    let unavailable = status == StatusCode::SERVICE_UNAVAILABLE;
    let mut response = (status, Json(body)).into_response();
    let headers = response.headers_mut();
    if let Some(secs) = retry_after.or(unavailable.then_some(1)) {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if unavailable {
        headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
