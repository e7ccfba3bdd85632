//! The end of a drain: answers still streaming when the grace period is over end with an
//! error that says why and what to do, so clients and the audit trail see an interrupted
//! answer rather than a connection cut mid-byte.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crisp_engine::{BackendError, Chunk, ChunkStream};
use futures::Stream;
use tokio::sync::watch;

/// `stream`, ended by an [`BackendError::Unavailable`] naming `region` once `cut` turns
/// true; an answer that has already ended is left alone.
pub fn until_cut(stream: ChunkStream, mut cut: watch::Receiver<bool>, region: &str) -> ChunkStream {
    let region = region.to_owned();
    Box::pin(Cut {
        inner: Some(stream),
        cut: Some(Box::pin(async move {
            let _ = cut.wait_for(|c| *c).await;
            region
        })),
    })
}

struct Cut {
    /// `None` once cut.
    inner: Option<ChunkStream>,
    /// Resolves with the region's code when the grace period is over; `None` once the
    /// answer has ended either way.
    cut: Option<Pin<Box<dyn Future<Output = String> + Send>>>,
}

impl Stream for Cut {
    type Item = Result<Chunk, BackendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(cut) = &mut this.cut
            && let Poll::Ready(region) = cut.as_mut().poll(cx)
        {
            this.cut = None;
            // Dropping the answer stops its generation.
            this.inner = None;
            return Poll::Ready(Some(Err(BackendError::Unavailable(format!(
                "the node in {region} stopped while the answer was streaming (its drain grace period ended); send the request again"
            )))));
        }
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        let item = std::task::ready!(inner.as_mut().poll_next(cx));
        if !matches!(item, Some(Ok(Chunk::Delta(_)))) {
            // Ended or broke on its own: nothing left to cut.
            this.cut = None;
        }
        Poll::Ready(item)
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
        let mut s = until_cut(endless(), rx, "eu-west-1");
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
            "eu-west-1",
        );
        assert!(matches!(s.next().await, Some(Ok(Chunk::Delta(_)))));
        assert!(matches!(s.next().await, Some(Ok(Chunk::Done { .. }))));
        // The answer let go of the signal when it ended.
        tx.send_replace(true);
        assert!(s.next().await.is_none());
    }
}
