//! Typed errors: one small struct per condition, each detected with
//! `err.is::<T>()` or `err.downcast_ref::<T>()` on the [`BoxError`] a service
//! returns.
//!
//! Each type documents the HTTP status an application should answer with;
//! [`classify`] is the one table of statuses, metric outcomes and
//! retryability, for this crate's errors and tower's own.
//!
//! [`Overloaded`] and [`Closed`] share their names with tower's
//! `load_shed::error::Overloaded` and `buffer::error::Closed` on purpose:
//! they mean the same, and carry more (a Retry-After estimate; the reason the
//! service closed). A stack mixing both kinds of layer can test for either;
//! [`classify`] treats each pair alike.
//!
//! # Examples
//!
//! ```
//! use candlewick::BoxError;
//! use candlewick::error::{Overloaded, status_code};
//! use std::time::Duration;
//!
//! let err: BoxError = Overloaded::new(Duration::from_millis(1500)).into();
//! assert_eq!(status_code(&*err), 429);
//! assert!(candlewick::error::classify(&*err).retryable);
//! let retry_after = err.downcast_ref::<Overloaded>().unwrap().retry_after_secs();
//! assert_eq!(retry_after, 2);
//! ```

use std::error::Error;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::BoxError;

/// The queue is full, or admitting the request would make it wait longer than
/// allowed. Nothing was queued. HTTP 429 with `Retry-After`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Overloaded {
    retry_after: Duration,
}

impl Overloaded {
    /// A rejection suggesting the caller retry after `retry_after`.
    pub fn new(retry_after: Duration) -> Self {
        Self { retry_after }
    }

    /// The estimated time until the work queued now has been served.
    pub fn retry_after(&self) -> Duration {
        self.retry_after
    }

    /// [`retry_after`](Self::retry_after) rounded up to whole seconds (at
    /// least 1), as the `Retry-After` header wants it.
    pub fn retry_after_secs(&self) -> u64 {
        let secs = self
            .retry_after
            .as_secs()
            .saturating_add(u64::from(self.retry_after.subsec_nanos() > 0));
        secs.max(1)
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "service overloaded, retry after {:?}", self.retry_after)
    }
}

impl Error for Overloaded {}

/// The request's deadline passed before it was served; if it was still queued,
/// it never reached the model. Also answered at admission, while the service
/// is busy, to a request whose deadline not even the smallest batch could
/// meet at the measured speed. HTTP 504.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadlineExceeded;

impl DeadlineExceeded {
    /// A new `DeadlineExceeded` error.
    pub fn new() -> Self {
        Self
    }
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("request deadline exceeded")
    }
}

impl Error for DeadlineExceeded {}

/// The service is shutting down and takes no new requests. HTTP 503.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Draining;

impl Draining {
    /// A new `Draining` error.
    pub fn new() -> Self {
        Self
    }
}

impl fmt::Display for Draining {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("service draining")
    }
}

impl Error for Draining {}

/// The service has shut down, its worker is gone, or no replica can serve
/// any more. HTTP 503.
///
/// When the service closed for a reason (every replica failed for good, the
/// inner service failed), [`reason`](Self::reason) and `source()` carry it.
#[derive(Debug, Clone, Default)]
pub struct Closed {
    reason: Option<Arc<dyn Error + Send + Sync>>,
}

impl Closed {
    /// A new `Closed` error, with no reason beyond a shutdown.
    pub fn new() -> Self {
        Self::default()
    }

    /// A `Closed` error caused by `reason`.
    pub fn because(reason: impl Into<BoxError>) -> Self {
        Self {
            reason: Some(Arc::from(reason.into())),
        }
    }

    /// Why the service closed, if it was not a plain shutdown.
    pub fn reason(&self) -> Option<&(dyn Error + Send + Sync + 'static)> {
        self.reason.as_deref()
    }
}

/// Equal when both have no reason, or reasons with the same message.
impl PartialEq for Closed {
    fn eq(&self, other: &Self) -> bool {
        self.reason.as_ref().map(ToString::to_string)
            == other.reason.as_ref().map(ToString::to_string)
    }
}

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            None => f.write_str("service closed"),
            Some(reason) => write!(f, "service closed: {reason}"),
        }
    }
}

impl Error for Closed {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.reason
            .as_deref()
            .map(|reason| reason as &(dyn Error + 'static))
    }
}

/// A load error that no retry can fix: a [`Loader`](crate::Loader) wraps its
/// error in this to say so (missing or malformed weights, a configuration the
/// model cannot run).
///
/// The replica then fails for good at once instead of retrying with
/// back-off: health reports it not live with this reason, and once no
/// replica can serve, requests are answered at once with [`Closed`]
/// carrying it.
#[derive(Debug)]
pub struct Unrecoverable {
    source: BoxError,
}

impl Unrecoverable {
    /// Marks `source` as a load error no retry can fix.
    pub fn new(source: impl Into<BoxError>) -> Self {
        Self {
            source: source.into(),
        }
    }

    /// Whether `err`, or an error in its `source()` chain, is `Unrecoverable`.
    pub fn is_in(err: &(dyn Error + 'static)) -> bool {
        find::<Self>(err).is_some()
    }
}

impl fmt::Display for Unrecoverable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl Error for Unrecoverable {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.source)
    }
}

/// The input was rejected at admission by the model's validation and never
/// entered a batch. HTTP 422.
#[derive(Debug)]
pub struct InvalidInput {
    source: BoxError,
}

impl InvalidInput {
    /// Wraps the reason the input was rejected.
    pub fn new(reason: impl Into<BoxError>) -> Self {
        Self {
            source: reason.into(),
        }
    }

    /// Why the input was rejected.
    pub fn reason(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.source
    }
}

impl fmt::Display for InvalidInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid input: {}", self.source)
    }
}

impl Error for InvalidInput {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.source)
    }
}

/// The request needs more than the service can give it even when idle: more
/// time than it has (its estimated service time, from the measured cost of batches,
/// exceeds the time to its deadline, which the smallest batch would meet), or
/// more inputs than the queue holds. Retrying cannot help. Nothing was
/// queued. HTTP 413.
///
/// (An idle service that measured no batch for 5 s lets one request it
/// would refuse for time through instead, so that an estimate inflated by
/// a passing slowness is measured again, not kept for good.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    reason: String,
}

impl TooLarge {
    /// A request whose own service would take `estimate`, with `budget` left.
    pub fn slower_than(estimate: Duration, budget: Duration) -> Self {
        Self {
            reason: format!(
                "serving it alone would take an estimated {:.3} s, and it has {:.3} s",
                estimate.as_secs_f64(),
                budget.as_secs_f64()
            ),
        }
    }

    /// A request of `inputs` inputs, for a queue that holds `capacity`.
    pub fn more_inputs(inputs: usize, capacity: usize) -> Self {
        Self {
            reason: format!("{inputs} inputs, and the queue holds at most {capacity}"),
        }
    }
}

impl fmt::Display for TooLarge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the request is too large to serve: {}", self.reason)
    }
}

impl Error for TooLarge {}

/// How a batch failed inside the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailureKind {
    /// `forward` returned an error.
    Error,
    /// `forward` panicked; the replica is being reloaded.
    Panic,
    /// The batch ran longer than the stall timeout; the replica was replaced.
    Stalled,
    /// `forward` returned a different number of outputs than it was given inputs.
    OutputCount {
        /// The number of inputs in the batch.
        expected: usize,
        /// The number of outputs the model returned.
        actual: usize,
    },
}

/// The batch this request was part of failed in the model. HTTP 500.
///
/// Every request of the failed batch receives a clone of the same error.
#[derive(Debug, Clone)]
pub struct ModelFailed {
    kind: FailureKind,
    source: Arc<dyn Error + Send + Sync>,
}

impl ModelFailed {
    /// A failure of the given kind, caused by `source`.
    pub fn new(kind: FailureKind, source: impl Into<BoxError>) -> Self {
        Self {
            kind,
            source: Arc::from(source.into()),
        }
    }

    /// How the batch failed.
    pub fn kind(&self) -> FailureKind {
        self.kind
    }
}

/// Equal when of the same kind with the same message.
impl PartialEq for ModelFailed {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && (Arc::ptr_eq(&self.source, &other.source)
                || self.source.to_string() == other.source.to_string())
    }
}

impl fmt::Display for ModelFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FailureKind::Error => write!(f, "model failed: {}", self.source),
            FailureKind::Panic => write!(f, "model panicked: {}", self.source),
            FailureKind::Stalled => write!(f, "model stalled: {}", self.source),
            FailureKind::OutputCount { expected, actual } => write!(
                f,
                "model returned {actual} outputs for a batch of {expected} inputs"
            ),
        }
    }
}

impl Error for ModelFailed {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.source)
    }
}

/// The first error of type `E` in `err` and its `source()` chain.
pub fn find<'a, E: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a E> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(found) = err.downcast_ref::<E>() {
            return Some(found);
        }
        next = err.source();
    }
    None
}

/// How a failed request is reported, wherever it is reported: the HTTP
/// status to answer, the `outcome` label it counts under in
/// `candlewick_requests_total`, and whether sending it again later may
/// succeed. [`classify`] is the one table behind the metrics and
/// [`status_code`]; the example server reads it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Class {
    /// The HTTP status to answer with.
    pub status: http::StatusCode,
    /// The `outcome` label of the requests metric.
    pub outcome: &'static str,
    /// Whether the same request may succeed later (here or on another
    /// instance): overload, deadlines, shutdown, a panicking or stalled
    /// model. Invalid input and a model's own error are not.
    pub retryable: bool,
}

impl Class {
    const fn new(status: http::StatusCode, outcome: &'static str, retryable: bool) -> Self {
        Self {
            status,
            outcome,
            retryable,
        }
    }
}

/// The [`Class`] of `err`: the first error of this crate, or tower's own
/// `Overloaded` (load shed), `Elapsed` (timeout) and `Closed` (buffer), found
/// in `err` and its `source()` chain. Anything else is a 500 counted as a
/// model error, not retryable.
///
/// | error | status | outcome | retryable |
/// |---|---|---|---|
/// | [`Overloaded`], tower's `load_shed::error::Overloaded` | 429 | `overloaded` | yes |
/// | [`InvalidInput`] | 422 | `invalid` | no |
/// | [`TooLarge`] | 413 | `invalid` | no |
/// | [`DeadlineExceeded`], tower's `timeout::error::Elapsed` | 504 | `deadline` | yes |
/// | [`Draining`] | 503 | `draining` | yes |
/// | [`Closed`], tower's `buffer::error::Closed` | 503 | `closed` | yes |
/// | [`ModelFailed`]: `Panic`, `Stalled` | 500 | `model_error` | yes |
/// | [`ModelFailed`]: `Error`, `OutputCount`; anything else | 500 | `model_error` | no |
pub fn classify(err: &(dyn Error + 'static)) -> Class {
    use http::StatusCode as S;
    let mut next = Some(err);
    while let Some(err) = next {
        let class = if err.is::<Overloaded>() || err.is::<tower::load_shed::error::Overloaded>() {
            Class::new(S::TOO_MANY_REQUESTS, "overloaded", true)
        } else if err.is::<InvalidInput>() {
            Class::new(S::UNPROCESSABLE_ENTITY, "invalid", false)
        } else if err.is::<TooLarge>() {
            Class::new(S::PAYLOAD_TOO_LARGE, "invalid", false)
        } else if err.is::<DeadlineExceeded>() || err.is::<tower::timeout::error::Elapsed>() {
            Class::new(S::GATEWAY_TIMEOUT, "deadline", true)
        } else if err.is::<Draining>() {
            Class::new(S::SERVICE_UNAVAILABLE, "draining", true)
        } else if err.is::<Closed>() || err.is::<tower::buffer::error::Closed>() {
            Class::new(S::SERVICE_UNAVAILABLE, "closed", true)
        } else if let Some(failed) = err.downcast_ref::<ModelFailed>() {
            let transient = matches!(failed.kind(), FailureKind::Panic | FailureKind::Stalled);
            Class::new(S::INTERNAL_SERVER_ERROR, "model_error", transient)
        } else {
            next = err.source();
            continue;
        };
        return class;
    }
    Class::new(S::INTERNAL_SERVER_ERROR, "model_error", false)
}

/// The HTTP status an application should answer `err` with: the status of
/// its [`classify`] class.
pub fn status_code(err: &(dyn Error + 'static)) -> http::StatusCode {
    classify(err).status
}
