//! The backbone: how nodes forward requests to each other and learn each other's load.
//! HTTP/2 between the peer addresses of the catalog, one multiplexed connection per peer.

pub mod client;
pub mod server;
pub mod wire;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};

/// Splits a byte stream into lines (without the newline). A final line without a newline is
/// still yielded; a line over `max_line` bytes is an error.
pub(crate) fn lines<S, E>(body: S, max_line: usize) -> impl Stream<Item = Result<Bytes, String>>
where
    S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
    E: std::fmt::Display,
{
    futures::stream::unfold(
        (body, BytesMut::new(), false),
        move |(mut body, mut buf, mut done)| async move {
            loop {
                if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                    let line = buf.split_to(pos + 1).freeze().slice(..pos);
                    return Some((Ok(line), (body, buf, done)));
                }
                if buf.len() > max_line {
                    return Some((
                        Err(format!("a line is longer than {max_line} bytes")),
                        (body, BytesMut::new(), true),
                    ));
                }
                if done {
                    if buf.is_empty() {
                        return None;
                    }
                    let rest = buf.split().freeze();
                    return Some((Ok(rest), (body, buf, done)));
                }
                match body.next().await {
                    Some(Ok(chunk)) => buf.extend_from_slice(&chunk),
                    Some(Err(e)) => {
                        return Some((Err(e.to_string()), (body, BytesMut::new(), true)));
                    }
                    None => done = true,
                }
            }
        },
    )
}
