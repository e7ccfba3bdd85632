//! `application/vnd.amazon.eventstream` framing of streamed answers, through the
//! `aws-smithy-eventstream` crate (prelude, headers and CRCs are its business).

use aws_smithy_eventstream::frame::write_message_to;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use bytes::Bytes;

pub const CONTENT_TYPE: &str = "application/vnd.amazon.eventstream";

fn frame(headers: Vec<Header>, payload: Vec<u8>) -> Bytes {
    let message = Message::new_from_parts(headers, payload);
    let mut out = Vec::with_capacity(128);
    // Encoding a well-formed message into a Vec cannot fail; an empty frame would be
    // rejected by the client's CRC check rather than silently accepted.
    let _ = write_message_to(&message, &mut out);
    Bytes::from(out)
}

/// An event frame (`:message-type` = event) with a JSON payload.
pub fn event(event_type: &'static str, payload: &serde_json::Value) -> Bytes {
    frame(
        vec![
            Header::new(":event-type", HeaderValue::String(event_type.into())),
            Header::new(
                ":content-type",
                HeaderValue::String("application/json".into()),
            ),
            Header::new(":message-type", HeaderValue::String("event".into())),
        ],
        serde_json::to_vec(payload).unwrap_or_default(),
    )
}

/// An exception frame, as the SDKs raise them mid-stream (`throttlingException`,
/// `modelStreamErrorException`, `internalServerException`, ...).
pub fn exception(exception_type: &'static str, message: &str) -> Bytes {
    frame(
        vec![
            Header::new(
                ":exception-type",
                HeaderValue::String(exception_type.into()),
            ),
            Header::new(
                ":content-type",
                HeaderValue::String("application/json".into()),
            ),
            Header::new(":message-type", HeaderValue::String("exception".into())),
        ],
        serde_json::to_vec(&serde_json::json!({ "message": message })).unwrap_or_default(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use aws_smithy_eventstream::frame::{DecodedFrame, MessageFrameDecoder};

    fn decode(bytes: &Bytes) -> Message {
        let mut buf = bytes.clone();
        match MessageFrameDecoder::new().decode_frame(&mut buf).unwrap() {
            DecodedFrame::Complete(m) => m,
            DecodedFrame::Incomplete => panic!("incomplete frame"),
        }
    }

    fn header<'a>(m: &'a Message, name: &str) -> &'a str {
        m.headers()
            .iter()
            .find(|h| h.name().as_str() == name)
            .and_then(|h| h.value().as_string().ok())
            .map(|s| s.as_str())
            .unwrap()
    }

    /// The exact bytes of a `messageStart` frame: a change here changes the wire format
    /// every SDK parses, so it must be deliberate.
    #[test]
    fn message_start_frame_snapshot() {
        let frame = event("messageStart", &serde_json::json!({"role": "assistant"}));
        assert_eq!(
            hex::encode(&frame),
            include_str!("../../../tests/fixtures/message_start.frame.hex").trim()
        );
        let m = decode(&frame);
        assert_eq!(header(&m, ":event-type"), "messageStart");
        assert_eq!(header(&m, ":message-type"), "event");
        assert_eq!(header(&m, ":content-type"), "application/json");
        assert_eq!(m.payload().as_ref(), br#"{"role":"assistant"}"#);
    }

    #[test]
    fn exception_frames_carry_their_type() {
        let m = decode(&exception("throttlingException", "all regions full"));
        assert_eq!(header(&m, ":message-type"), "exception");
        assert_eq!(header(&m, ":exception-type"), "throttlingException");
        assert_eq!(m.payload().as_ref(), br#"{"message":"all regions full"}"#);
    }
}
