//! Containing user code: panics caught where they happen, locks that never
//! poison into an abort, and time arithmetic that saturates.
//!
//! Every hook a user supplies (a loader, a model and its `Drop`, cost and
//! validation hooks, an inner service) may panic, and a caller may pass
//! `Duration::MAX`. The helpers here keep the crate's bookkeeping whole when
//! either happens.

use std::any::Any;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use pin_project::pin_project;

/// Locks `mutex`, recovering the guard if a panic poisoned it.
///
/// Every critical section in this crate leaves its state consistent before it
/// runs anything that may panic, so a poisoned lock holds valid state.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `f`, returning the panic's message if it panicked.
pub(crate) fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_message(&*payload))
}

/// A future that turns a panic while polling `F` into `Err(message)`.
#[pin_project]
pub(crate) struct CatchUnwind<F>(#[pin] pub(crate) F);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = self.project().0;
        match catch(|| future.poll(cx)) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(message) => Poll::Ready(Err(message)),
        }
    }
}

/// Drops `value`, logging instead of unwinding if its `Drop` panics.
pub(crate) fn drop_contained<T>(value: T, what: &str) {
    if let Err(message) = catch(move || drop(value)) {
        tracing::error!(%message, "dropping {what} panicked");
    }
}

/// A value whose `Drop` is user code, held where a refusal may drop it:
/// dropped with [`drop_contained`], so a panic there is logged and the
/// caller still hears why it was refused.
pub(crate) struct Contained<T> {
    value: Option<T>,
    what: &'static str,
}

impl<T> Contained<T> {
    pub(crate) fn new(value: T, what: &'static str) -> Self {
        Self {
            value: Some(value),
            what,
        }
    }

    pub(crate) fn get(&self) -> &T {
        self.value.as_ref().expect("present until taken")
    }

    /// The value, now the caller's to drop.
    pub(crate) fn into_inner(mut self) -> T {
        self.value.take().expect("present until taken")
    }
}

impl<T> Drop for Contained<T> {
    fn drop(&mut self) {
        if let Some(value) = self.value.take() {
            drop_contained(value, self.what);
        }
    }
}

/// The message of a panic payload.
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// `at + duration`, or an instant decades away when that overflows.
pub(crate) fn saturating_deadline(
    at: tokio::time::Instant,
    duration: Duration,
) -> tokio::time::Instant {
    // Thirty years, as tokio's own "far future": never reached, never overflowing.
    const FAR: Duration = Duration::from_secs(86_400 * 365 * 30);
    at.checked_add(duration)
        .or_else(|| at.checked_add(FAR))
        .unwrap_or(at)
}

/// How long `amount` takes at `per_second`, saturating at `Duration::MAX`
/// (and zero for a non-positive or unknown amount).
pub(crate) fn duration_at_rate(amount: f64, per_second: f64) -> Duration {
    Duration::try_from_secs_f64(amount / per_second).unwrap_or(if amount / per_second > 0.0 {
        Duration::MAX
    } else {
        Duration::ZERO
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_arithmetic_saturates() {
        let now = tokio::time::Instant::now();
        assert!(saturating_deadline(now, Duration::MAX) > now + Duration::from_secs(86_400));
        assert_eq!(duration_at_rate(1e300, 1e-300), Duration::MAX);
        assert_eq!(duration_at_rate(1.0, 0.0), Duration::MAX);
        assert_eq!(duration_at_rate(0.0, 0.0), Duration::ZERO);
        assert_eq!(duration_at_rate(3.0, 2.0), Duration::from_millis(1500));
    }

    #[test]
    fn a_poisoned_lock_is_recovered() {
        let mutex = std::sync::Arc::new(Mutex::new(1));
        let poisoner = mutex.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("poison");
        })
        .join();
        assert!(mutex.is_poisoned());
        *lock(&mutex) += 1;
        assert_eq!(*lock(&mutex), 2);
    }
}
