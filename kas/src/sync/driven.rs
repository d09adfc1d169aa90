//! A stream written as one async function that hands out its items with
//! [`Yielder::send`], polled by whoever consumes the stream.
//!
//! A long-lived server stream (an agent's configuration stream) is usually a task feeding
//! a channel. For thousands of mostly idle streams that is a task and a channel block each
//! for nothing: the HTTP/2 stream sending the response already polls it. Here the
//! function runs inside the stream's own poll, and an item waits in a one-item slot until
//! the consumer takes it (the same backpressure as a channel of one). Dropping the stream
//! drops the function where it waits.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::Stream;

type Slot<T> = Arc<Mutex<Option<T>>>;

fn lock<T>(slot: &Slot<T>) -> MutexGuard<'_, Option<T>> {
    // Only this module touches the slot, and never panics while holding it.
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// Hands items to the stream's consumer.
pub struct Yielder<T> {
    slot: Slot<T>,
}

impl<T> Yielder<T> {
    /// Hands `item` out; resolves once the consumer has taken it.
    pub async fn send(&self, item: T) {
        *lock(&self.slot) = Some(item);
        // The first poll finds the item still there and returns Pending without a waker:
        // the stream returns the item at once and polls this again when the consumer asks
        // for the next one.
        std::future::poll_fn(|_| {
            if lock(&self.slot).is_some() {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }
}

/// The stream of what `body` sends; it ends when `body` returns.
pub fn driven<T, F, Fut>(body: F) -> Driven<T, Fut>
where
    F: FnOnce(Yielder<T>) -> Fut,
    Fut: Future<Output = ()>,
{
    let slot: Slot<T> = Arc::new(Mutex::new(None));
    let body = body(Yielder { slot: slot.clone() });
    Driven {
        slot,
        body: Some(Box::pin(body)),
    }
}

pub struct Driven<T, Fut> {
    slot: Slot<T>,
    body: Option<Pin<Box<Fut>>>,
}

impl<T, Fut> Stream for Driven<T, Fut>
where
    Fut: Future<Output = ()>,
{
    type Item = T;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(body) = self.body.as_mut() {
            if body.as_mut().poll(cx).is_ready() {
                self.body = None;
            }
        }
        if let Some(item) = lock(&self.slot).take() {
            return Poll::Ready(Some(item));
        }
        if self.body.is_none() {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn items_come_in_order_and_the_stream_ends_with_the_body() {
        let stream = driven(|y| async move {
            for i in 0..3 {
                y.send(i).await;
                tokio::task::yield_now().await;
            }
        });
        assert_eq!(stream.collect::<Vec<_>>().await, vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn the_body_waits_until_its_item_is_taken() {
        let progress = Arc::new(Mutex::new(0));
        let seen = progress.clone();
        let mut stream = driven(|y| async move {
            for i in 0..3 {
                y.send(i).await;
                *seen.lock().unwrap() = i + 1;
            }
        });
        assert_eq!(stream.next().await, Some(0));
        assert_eq!(*progress.lock().unwrap(), 0, "not past its first send");
        assert_eq!(stream.next().await, Some(1));
        assert_eq!(*progress.lock().unwrap(), 1);
        drop(stream);
    }
}
