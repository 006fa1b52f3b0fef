//! Typed errors: one small struct per condition, each detected with
//! `err.is::<T>()` or `err.downcast_ref::<T>()` on the [`BoxError`] a service
//! returns.
//!
//! Each type documents the HTTP status an application should answer with.
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
        let secs = self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0);
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
/// it never reached the model. HTTP 504.
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

/// The service has shut down, or its worker is gone. HTTP 503.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Closed;

impl Closed {
    /// A new `Closed` error.
    pub fn new() -> Self {
        Self
    }
}

impl fmt::Display for Closed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("service closed")
    }
}

impl Error for Closed {}

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

/// The HTTP status code an application should answer `err` with: 429, 422,
/// 504, 503, 500 for the errors of this crate (looking through `source()` chains),
/// 500 for anything else.
pub fn status_code(err: &(dyn Error + 'static)) -> u16 {
    let mut next = Some(err);
    while let Some(err) = next {
        if err.is::<Overloaded>() {
            return 429;
        }
        if err.is::<InvalidInput>() {
            return 422;
        }
        if err.is::<DeadlineExceeded>() {
            return 504;
        }
        if err.is::<Closed>() || err.is::<Draining>() {
            return 503;
        }
        next = err.source();
    }
    500
}
