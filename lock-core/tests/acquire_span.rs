//! One `lock.acquire` span per acquisition, whichever path it takes, and the core's events of
//! an acquisition inside it.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lock_core::{LockOptions, Locker, RetryPolicy};
use lock_memory::MemoryLock;
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Counts `lock.acquire` spans and the core's events outside any of them.
#[derive(Default)]
struct Spans {
    next: AtomicU64,
    acquire_spans: Mutex<Vec<u64>>,
    stack: Mutex<Vec<u64>>,
    /// The core's events of the locker, with whether a `lock.acquire` span was current.
    events: Mutex<Vec<(String, bool)>>,
}

impl Subscriber for Spans {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let id = self.next.fetch_add(1, Ordering::SeqCst) + 1;
        if span.metadata().name() == "lock.acquire" {
            self.acquire_spans.lock().unwrap().push(id);
        }
        Id::from_u64(id)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let target = event.metadata().target();
        if !target.starts_with("lock_core::locker") {
            return;
        }
        let stack = self.stack.lock().unwrap();
        let spans = self.acquire_spans.lock().unwrap();
        let inside = stack.last().is_some_and(|id| spans.contains(id));
        let mut message = String::new();
        struct Message<'a>(&'a mut String);
        impl tracing::field::Visit for Message<'_> {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                if field.name() == "message" {
                    *self.0 = format!("{value:?}");
                }
            }
        }
        event.record(&mut Message(&mut message));
        self.events.lock().unwrap().push((message, inside));
    }
    fn enter(&self, span: &Id) {
        self.stack.lock().unwrap().push(span.into_u64());
    }
    fn exit(&self, _: &Id) {
        self.stack.lock().unwrap().pop();
    }
}

fn options(retry: RetryPolicy) -> LockOptions {
    LockOptions::default()
        .with_ttl(Duration::from_secs(30))
        .with_retry(retry)
}

#[test]
fn one_span_per_acquisition_with_its_events_inside() {
    let spans = Arc::new(Spans::default());
    let dispatch = tracing::Dispatch::from(Arc::clone(&spans) as Arc<dyn Subscriber + Send + Sync>);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    tracing::dispatcher::with_default(&dispatch, || {
        runtime.block_on(async {
            let locker = Locker::new(MemoryLock::new());
            // A free key: settled in the first poll.
            let guard = locker.acquire("k").await.unwrap();
            // A held key, single attempt, then counted retries that give up.
            assert!(locker.try_acquire("k").await.unwrap().is_none());
            let counted = options(RetryPolicy::doubling(Duration::from_millis(5), 3));
            assert!(locker.acquire_with("k", &counted).await.is_err());
            drop(guard);
            // A writer that waits for a reader.
            let reader = locker.acquire_read("rw").await.unwrap();
            let writer = locker.acquire_write("rw");
            tokio::pin!(writer);
            assert!(futures_poll_once(writer.as_mut()).is_pending());
            drop(reader);
            let writer = writer.await.unwrap();
            drop(writer);
        });
    });
    assert_eq!(
        spans.acquire_spans.lock().unwrap().len(),
        5,
        "one span per acquisition"
    );
    let events = spans.events.lock().unwrap();
    assert!(events.len() >= 5, "{events:?}");
    for (message, inside) in events.iter() {
        assert!(inside, "event {message:?} outside the acquisition's span");
    }
}

fn futures_poll_once<F: std::future::Future>(
    future: std::pin::Pin<&mut F>,
) -> std::task::Poll<F::Output> {
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    future.poll(&mut context)
}
