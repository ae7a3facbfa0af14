//! A time limit on each request of the public API: 408 once its handler has waited
//! its limit (10 s, `REQUEST_TIMEOUT`) without answering.
//!
//! tower-http's `TimeoutLayer` makes its timer when the request arrives and polls it
//! before the handler, so every request put an entry into tokio's timer wheel and
//! took it out again (a lock each way, the clock read, the scheduler's handle
//! cloned), though nearly every request here is answered at its handler's first
//! poll. This one polls the handler first and makes the timer only when the handler
//! waits: the limit counts from that first wait. What runs before it is the
//! handler's first poll, which does not wait.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::time::Sleep;

/// A [`tower::Layer`] putting [`Deadline`] around a service.
#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    limit: Duration,
}

impl DeadlineLayer {
    pub fn new(limit: Duration) -> Self {
        Self { limit }
    }
}

impl<S> tower::Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            limit: self.limit,
        }
    }
}

/// A service whose answers come within `limit` of its first wait, or as 408.
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
}

impl<S, R> tower::Service<R> for Deadline<S>
where
    S: tower::Service<R, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        DeadlineFuture {
            inner: self.inner.call(request),
            timer: None,
            limit: self.limit,
        }
    }
}

pin_project_lite::pin_project! {
    /// The handler's future, and its timer once it has waited.
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        // Boxed: made only for a request that waits, and kept out of the size of
        // every request's future.
        timer: Option<Pin<Box<Sleep>>>,
        limit: Duration,
    }
}

impl<F, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(answer) = this.inner.poll(cx) {
            return Poll::Ready(answer);
        }
        let limit = *this.limit;
        let timer = this
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        // Outside tokio's task budget, as tokio's own `timeout` does when its future
        // spent the budget: a handler that used up the budget at every poll would
        // otherwise find the timer answering "not yet" for ever.
        let mut timer = tokio::task::coop::unconstrained(timer.as_mut());
        match Pin::new(&mut timer).poll(cx) {
            Poll::Ready(()) => Poll::Ready(Ok(StatusCode::REQUEST_TIMEOUT.into_response())),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tower::{Layer, Service};

    use super::*;

    /// A service answering 200 at once, or after its handler's wait of `wait`.
    fn service(
        wait: Option<Duration>,
    ) -> impl Service<(), Response = Response, Error = Infallible, Future: Send> + Clone {
        tower::service_fn(move |()| async move {
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
            }
            Ok::<_, Infallible>(StatusCode::OK.into_response())
        })
    }

    /// The handler's wait is on tokio's paused clock, which moves only when every
    /// task waits: no real time passes.
    #[tokio::test(start_paused = true)]
    async fn the_limit_answers_408_at_its_time_and_leaves_an_earlier_answer_alone() {
        for (wait, status, answered_after) in [
            (3600, StatusCode::REQUEST_TIMEOUT, 10),
            (9, StatusCode::OK, 9),
        ] {
            let mut svc = DeadlineLayer::new(Duration::from_secs(10))
                .layer(service(Some(Duration::from_secs(wait))));
            let started = tokio::time::Instant::now();
            let answer = svc.call(()).await.unwrap();
            assert_eq!(answer.status(), status, "a wait of {wait} s");
            assert_eq!(
                started.elapsed(),
                Duration::from_secs(answered_after),
                "a wait of {wait} s"
            );
        }
    }

    /// A handler that spends tokio's task budget at every poll (a loop over a
    /// resource that is always ready) is still stopped at the limit. Bounded, so
    /// that a build where the timer could not fire ends with the handler's 200.
    #[tokio::test(start_paused = true)]
    async fn a_handler_that_spends_its_budget_at_every_poll_is_still_stopped() {
        let mut svc =
            DeadlineLayer::new(Duration::from_secs(10)).layer(tower::service_fn(|()| async {
                for _ in 0..1_000_000 {
                    tokio::task::coop::consume_budget().await;
                }
                Ok::<_, Infallible>(StatusCode::OK.into_response())
            }));
        let answer = tokio::spawn(svc.call(()));
        // Its first poll: the budget spent, the handler waits and its timer is made.
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(11)).await;
        let answer = answer.await.unwrap().unwrap();
        assert_eq!(answer.status(), StatusCode::REQUEST_TIMEOUT);
    }

    /// A handler answering at its first poll makes no timer; one that waits makes
    /// exactly one, however often it is polled.
    #[tokio::test(start_paused = true)]
    async fn the_timer_is_made_only_when_the_handler_waits_and_only_once() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);

        let mut svc = DeadlineLayer::new(Duration::from_secs(10)).layer(service(None));
        let mut future = Box::pin(svc.call(()));
        assert!(matches!(future.as_mut().poll(&mut cx), Poll::Ready(Ok(_))));
        assert!(future.timer.is_none());

        // Woken by hand, not by its own timer: each poll finds it still waiting.
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&polls);
        let mut svc =
            DeadlineLayer::new(Duration::from_secs(10)).layer(tower::service_fn(move |()| {
                let counted = Arc::clone(&counted);
                std::future::poll_fn(move |_| {
                    counted.fetch_add(1, Ordering::Relaxed);
                    Poll::<Result<Response, Infallible>>::Pending
                })
            }));
        let mut future = Box::pin(svc.call(()));
        assert!(future.as_mut().poll(&mut cx).is_pending());
        let first = future.timer.as_ref().map(|t| t.deadline());
        assert!(first.is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(future.as_mut().poll(&mut cx).is_pending());
        assert_eq!(future.timer.as_ref().map(|t| t.deadline()), first);
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }
}
