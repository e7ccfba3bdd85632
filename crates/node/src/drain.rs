//! The end of a drain: answers still streaming when the grace period is over end with an
//! error that says why and what to do, so clients and the audit trail see an interrupted
//! answer rather than a connection cut mid-byte.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use crisp_engine::{BackendError, Chunk, ChunkStream};
use futures::Stream;
use tokio::sync::watch;

/// `stream`, ended by an [`BackendError::Unavailable`] naming `region` once `cut` turns
/// true; an answer that has already ended is left alone.
pub fn until_cut(stream: ChunkStream, cut: watch::Receiver<bool>, region: Arc<str>) -> ChunkStream {
    Box::pin(Cut {
        inner: Some(stream),
        cut: Some(Signal::Idle(cut, region)),
    })
}

/// The cut signal of one answer: its receiver until the answer first waits, then the
/// future that resolves when the cut comes (set up only for answers that wait, and once).
enum Signal {
    Idle(watch::Receiver<bool>, Arc<str>),
    Waiting(Pin<Box<dyn Future<Output = Arc<str>> + Send>>),
}

struct Cut {
    /// `None` once cut.
    inner: Option<ChunkStream>,
    /// `None` once the answer has ended either way.
    cut: Option<Signal>,
}

impl Cut {
    /// Whether the cut has come; registers for it otherwise.
    fn poll_cut(&mut self, cx: &mut Context<'_>) -> Poll<Arc<str>> {
        let Some(signal) = self.cut.take() else {
            return Poll::Pending;
        };
        let mut waiting = match signal {
            Signal::Waiting(f) => f,
            Signal::Idle(mut rx, region) => Box::pin(async move {
                let _ = rx.wait_for(|c| *c).await;
                region
            }),
        };
        match waiting.as_mut().poll(cx) {
            Poll::Ready(region) => Poll::Ready(region),
            Poll::Pending => {
                self.cut = Some(Signal::Waiting(waiting));
                Poll::Pending
            }
        }
    }
}

impl Stream for Cut {
    type Item = Result<Chunk, BackendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        // The answer first: the cut is only looked for while it waits (an answer that
        // flows is polled again soon enough, and waits between tokens).
        if let Poll::Ready(item) = inner.as_mut().poll_next(cx) {
            if !matches!(item, Some(Ok(Chunk::Delta(_)))) {
                // Ended or broke on its own: nothing left to cut.
                this.cut = None;
            }
            return Poll::Ready(item);
        }
        match this.poll_cut(cx) {
            Poll::Ready(region) => {
                // Dropping the answer stops its generation.
                this.inner = None;
                Poll::Ready(Some(Err(BackendError::Unavailable(format!(
                    "the node in {region} stopped while the answer was streaming (its drain grace period ended); send the request again"
                )))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crisp_engine::{FinishReason, Usage};
    use futures::StreamExt;

    fn endless() -> ChunkStream {
        Box::pin(
            futures::stream::iter([Ok(Chunk::Delta("a".into()))]).chain(futures::stream::pending()),
        )
    }

    #[tokio::test]
    async fn a_streaming_answer_ends_with_an_error_when_cut() {
        let (tx, rx) = watch::channel(false);
        let mut s = until_cut(endless(), rx, "eu-west-1".into());
        assert!(matches!(s.next().await, Some(Ok(Chunk::Delta(_)))));
        tx.send(true).unwrap();
        match s.next().await {
            Some(Err(BackendError::Unavailable(m))) => {
                assert!(
                    m.contains("eu-west-1") && m.contains("send the request again"),
                    "{m}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(s.next().await.is_none());
    }

    #[tokio::test]
    async fn a_finished_answer_is_not_cut() {
        let (tx, rx) = watch::channel(false);
        let done = Chunk::Done {
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
        };
        let mut s = until_cut(
            Box::pin(futures::stream::iter([
                Ok(Chunk::Delta("a".into())),
                Ok(done),
            ])),
            rx,
            "eu-west-1".into(),
        );
        assert!(matches!(s.next().await, Some(Ok(Chunk::Delta(_)))));
        assert!(matches!(s.next().await, Some(Ok(Chunk::Done { .. }))));
        // The answer let go of the signal when it ended.
        tx.send_replace(true);
        assert!(s.next().await.is_none());
    }
}
