//! The probe endpoints as a framework-agnostic tower HTTP service.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::{Ready, ready};
use std::task::{Context, Poll};

use http::{Request, Response, StatusCode, header};
use tower::Service;

use super::{Check, Health, HealthReport};
use crate::device::format_location;

/// The paths [`ProbeService`] answers on.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "serde", serde(default))]
#[non_exhaustive]
pub struct ProbePaths {
    /// Liveness. Default: `/livez`.
    pub live: String,
    /// Readiness. Default: `/readyz`.
    pub ready: String,
    /// Startup. Default: `/startupz`.
    pub started: String,
}

impl Default for ProbePaths {
    fn default() -> Self {
        Self {
            live: "/livez".to_owned(),
            ready: "/readyz".to_owned(),
            started: "/startupz".to_owned(),
        }
    }
}

impl ProbePaths {
    /// Sets all three paths.
    pub fn new(
        live: impl Into<String>,
        ready: impl Into<String>,
        started: impl Into<String>,
    ) -> Self {
        Self {
            live: live.into(),
            ready: ready.into(),
            started: started.into(),
        }
    }
}

/// A `tower::Service<http::Request<B>>` answering the startup, readiness and
/// liveness probes: 200 when the check passes, 503 when it fails, 404 for any
/// other path, each with a short JSON body giving the reason and the state of
/// every replica.
///
/// It answers from state alone and is always ready, so probes never wait
/// behind model work.
///
/// # Examples
///
/// ```
/// use candle_core::Device;
/// use candlewick::{BoxError, Serving, ServingConfig};
/// use candlewick::health::{ProbePaths, ProbeService};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), BoxError> {
/// let loader = |_: &Device| -> Result<_, BoxError> {
///     Ok(|batch: &[u8]| -> Result<Vec<u8>, BoxError> { Ok(batch.to_vec()) })
/// };
/// let serving = Serving::start(loader, ServingConfig::default())?;
/// let probes = ProbeService::new(serving.health(), ProbePaths::default());
/// let request = http::Request::get("/livez").body(())?;
/// let response = probes.oneshot(request).await?;
/// assert_eq!(response.status(), 200);
/// assert!(response.body().contains("\"check\":\"live\""));
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ProbeService {
    health: Health,
    paths: ProbePaths,
}

impl ProbeService {
    /// Probes of `health` on `paths`.
    pub fn new(health: Health, paths: ProbePaths) -> Self {
        Self { health, paths }
    }

    /// The paths this service answers on.
    pub fn paths(&self) -> &ProbePaths {
        &self.paths
    }

    /// The response to a probe of `path`.
    pub fn respond(&self, path: &str) -> Response<String> {
        let report = self.health.report();
        let (name, check) = if path == self.paths.live {
            ("live", &report.live)
        } else if path == self.paths.ready {
            ("ready", &report.ready)
        } else if path == self.paths.started {
            ("started", &report.started)
        } else {
            return json(
                StatusCode::NOT_FOUND,
                r#"{"error":"no such probe"}"#.to_owned(),
            );
        };
        let status = if check.ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json(status, body(name, check, &report))
    }
}

impl<B> Service<Request<B>> for ProbeService {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = Ready<Result<Response<String>, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        ready(Ok(self.respond(request.uri().path())))
    }
}

fn json(status: StatusCode, body: String) -> Response<String> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// `{"check":…,"ok":…,"reason":…,"state":…,"replicas":[{…},…]}`
fn body(name: &str, check: &Check, report: &HealthReport) -> String {
    let mut out = String::with_capacity(128 + 96 * report.replicas.len());
    let _ = write!(
        out,
        r#"{{"check":"{name}","ok":{},"reason":"{}","state":"{}","replicas":["#,
        check.ok,
        escape(&check.reason),
        report.state.as_str(),
    );
    for (index, replica) in report.replicas.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            r#"{{"device":"{}","state":"{}","restarts":{},"stalls":{}"#,
            format_location(replica.device),
            replica.state.as_str(),
            replica.restarts,
            replica.stalls,
        );
        if replica.stuck_threads > 0 {
            let _ = write!(out, r#","stuck_threads":{}"#, replica.stuck_threads);
        }
        if let Some(err) = &replica.last_error {
            let _ = write!(out, r#","last_error":"{}""#, escape(err));
        }
        if let Some(warning) = replica.cpu_threads.and_then(|t| t.warning()) {
            let _ = write!(out, r#","warning":"{}""#, escape(&warning));
        }
        out.push('}');
    }
    out.push_str("]}");
    out
}

/// Escapes `text` for a JSON string.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escapes_what_json_requires() {
        assert_eq!(escape("a\"b\\c\nd\u{1}"), "a\\\"b\\\\c\\nd\\u0001");
    }
}
